"""Sampling wire requests -> domain: samplers, and sample requests with their stop rules."""

from __future__ import annotations

from datetime import datetime

from tinkerd.api import schemas
from tinkerd.api.context import ServedModelInfo
from tinkerd.api.convert.model_input import model_input
from tinkerd.api.convert.tensors import check_tokens, target_cells
from tinkerd.api.images import ImageRules
from tinkerd.domain import ops
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ids import sampler_id
from tinkerd.domain.records import Sampler
from tinkerd.domain.requests import Sample

MAX_NUM_SAMPLES = 256
# Which distribution sampled tokens' logprobs are under, per client: the SDK sends it with every request when built
# as ServiceClient(default_headers_overrides={LOGPROBS_HEADER: "sampled"}); without it, the server's setting.
LOGPROBS_HEADER = "X-Tinkerd-Sample-Logprobs"
DEFAULT_MAX_TOKENS = 16  # when a sampling request leaves max_tokens unset


def nonnegative(name: str, value: int) -> int:
    if value < 0:
        raise InvalidRequestError(f"{name} must be >= 0, got {value}")
    return value


def new_sampler(request: schemas.CreateSamplingSessionRequest, base_model: str, owner: str, now: datetime) -> Sampler:
    return Sampler(
        id=sampler_id(request.session_id, request.sampling_session_seq_id),
        session_id=request.session_id,
        owner=owner,
        base_model=base_model,
        created_at=now,
        model_path=request.model_path,
    )


def _stops(stop: str | list[str] | list[int] | None, model: ServedModelInfo) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(stop strings, stop token ids). Unset keeps the model's EOS; [] stops nowhere (runs to max_tokens); a list adds
    to EOS, as vLLM does, so a chat model still ends at its end-of-turn token."""
    if stop is None:
        return (), model.eos_token_ids
    if isinstance(stop, str):
        return (stop,), model.eos_token_ids
    if not stop:
        return (), ()
    if all(isinstance(item, str) for item in stop):
        return tuple(str(item) for item in stop), model.eos_token_ids
    ids = tuple(int(item) for item in stop)
    return (), tuple(dict.fromkeys(ids + model.eos_token_ids))


def logprobs_of(value: str) -> ops.LogprobDistribution:
    """The distribution named by the ``X-Tinkerd-Sample-Logprobs`` header (or the server setting)."""
    for name in ops.LOGPROB_DISTRIBUTIONS:
        if value.strip().lower() == name:
            return name
    raise InvalidRequestError(f"{LOGPROBS_HEADER} must be one of {', '.join(ops.LOGPROB_DISTRIBUTIONS)}, got {value!r}")


def sample(
    request: schemas.SampleRequest,
    sampler: Sampler,
    model: ServedModelInfo,
    reported: ops.LogprobDistribution = "tempered",
    rules: ImageRules | None = None,
) -> Sample:
    built = model_input("prompt", request.prompt.chunks, rules)
    prompt = built.tokens
    check_tokens(prompt, "prompt", model.vocab_size, model.max_context_length)
    num_samples = 1 if request.num_samples is None else request.num_samples
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        raise InvalidRequestError(f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, got {num_samples}")
    wire = request.sampling_params
    max_tokens = DEFAULT_MAX_TOKENS if wire.max_tokens is None else wire.max_tokens
    if max_tokens < 1:
        raise InvalidRequestError(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
    if len(prompt) + max_tokens > model.max_context_length:
        raise InvalidRequestError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of "
            f"{model.max_context_length} tokens"
        )
    stop_strings, stop_ids = _stops(wire.stop, model)
    params = ops.SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if wire.temperature is None else wire.temperature,
        top_p=1.0 if wire.top_p is None else wire.top_p,
        top_k=-1 if wire.top_k is None else wire.top_k,
        seed=wire.seed,
        stop_strings=stop_strings,
        stop_token_ids=stop_ids,
        logprobs_of=reported,
    )
    targets = None
    if request.target_prompt_logprobs is not None:
        targets = target_cells(request.target_prompt_logprobs)
    return Sample(
        sampler_id=sampler.id,
        prompt=prompt,
        num_samples=num_samples,
        params=params,
        prompt_logprobs=bool(request.prompt_logprobs),
        topk_prompt_logprobs=nonnegative("topk_prompt_logprobs", request.topk_prompt_logprobs or 0),
        topk_sample_logprobs=nonnegative("topk_sample_logprobs", request.topk_sample_logprobs or 0),
        prompt_logprobs_last_n=request.prompt_logprobs_last_n,
        target_prompt_logprobs=targets,
        prompt_alt_tokens_k=nonnegative("prompt_alt_tokens_k", request.prompt_alt_tokens_k or 0),
        images=built.images,
    )


def sample_token_count(request: Sample) -> int:
    return len(request.prompt) + request.params.max_tokens * request.num_samples
