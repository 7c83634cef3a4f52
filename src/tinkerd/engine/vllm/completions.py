"""A tinkerd sampling request as a vLLM ``/v1/completions`` body, and vLLM's answer back as a ``SampleResult``.

The prompt goes as token ids and the answer comes back as token ids (``return_token_ids``; top-k entries keyed
``token_id:N`` by ``return_tokens_as_token_ids``), so no text round trip can change a token. vLLM stops only where
tinkerd would: ``ignore_eos`` (a stop token must be asked for), stop strings kept in the output, stop token ids,
``max_tokens``. ``n`` samples share one prefill in vLLM as in the builtin sampler.

Options vLLM cannot express are refused with an ``InvalidRequestError`` naming the field (``refuse_unsupported``).
Logprobs vLLM reports here are the model's raw distribution, ``log_softmax(logits)`` of its own forward; the
sampler backend replaces the sampled tokens' and prompt tokens' values with the trainer's (``engine/rescoring.py``)
when it has the trainer, as the builtin sampler does.
"""

from __future__ import annotations

from typing import Any

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import SampledSequence, SampleResult, StopReason, TopkRow
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.sample_job import SampleJob

_TOKEN_PREFIX = "token_id:"
_UNEMBEDDINGS_NOT_LM_HEAD = ("embed_out", "output", "embed_tokens")


def refuse_unsupported(job: SampleJob, *, max_logprobs: int, max_lora_rank: int, rescored: bool) -> None:
    """Raise InvalidRequestError naming the first option of ``job`` the vLLM backend cannot honour.

    ``rescored``: the trainer rescores the samples (it reports tempered logprobs at any temperature); without it
    only vLLM's own raw logprobs are there, the tempered distribution only at temperature 0 or 1."""
    why = " (the vLLM sampler backend cannot express it; run tinkerd with --sampler builtin for it)"
    params = job.params
    if not rescored and params.logprobs_of == "tempered" and params.temperature not in (0.0, 1.0):
        raise InvalidRequestError(
            f"tempered logprobs at temperature {params.temperature} are not supported for this model"
            + why
            + "; ask for 'model' logprobs (X-Tinkerd-Sample-Logprobs: model) or sample at temperature 0 or 1"
        )
    if job.target_prompt_logprobs is not None:
        raise InvalidRequestError("target_prompt_logprobs is not supported" + why)
    if (job.prompt_logprobs or job.topk_prompt_logprobs > 0) and job.num_samples > 1:
        # vLLM 0.32's CPU LoRA logits path crashes its engine on this combination (einsum size mismatch): refuse it
        raise InvalidRequestError(
            "prompt logprobs with num_samples > 1 are not supported"
            + why
            + "; ask for prompt logprobs in a request with num_samples=1"
        )
    if job.prompt_alt_tokens_k > 0:
        raise InvalidRequestError("prompt_alt_tokens_k is not supported" + why)
    if job.params.logprobs_of == "sampled":
        raise InvalidRequestError(
            "sampled logprobs (X-Tinkerd-Sample-Logprobs: sampled) are not supported"
            + why
            + "; 'tempered' and 'model' are"
        )
    k = job.topk_sample_logprobs
    if k > 0 and not (job.params.logprobs_of == "model" or job.params.temperature in (0.0, 1.0)):
        raise InvalidRequestError(
            "topk_sample_logprobs at a temperature other than 0 or 1 is not supported with 'tempered' logprobs"
            + why
            + "; ask for 'model' logprobs or sample at temperature 1"
        )
    for name, width in (("topk_sample_logprobs", k), ("topk_prompt_logprobs", job.topk_prompt_logprobs)):
        if width > max_logprobs:
            raise InvalidRequestError(
                f"{name} must be at most {max_logprobs} with the vLLM sampler backend, got {width}"
            )
    weights = job.weights
    if weights is not None:
        if weights.rank > max_lora_rank:
            raise InvalidRequestError(
                f"LoRA rank {weights.rank} is above the vLLM engine's --max-lora-rank {max_lora_rank} "
                "(raise it with --vllm-max-lora-rank)"
            )
        # vLLM applies a LoRA to the unembedding only as `lm_head` (LogitsProcessorWithLoRA, on the models that list
        # it among their embedding modules); other names for it (GPT-NeoX's embed_out, ...) it has no wrapper for
        other = sorted({leaf for name in weights.a if (leaf := name.rsplit(".", 1)[-1]) in _UNEMBEDDINGS_NOT_LM_HEAD})
        if other:
            raise InvalidRequestError(
                f"an adapter that trains the unembedding {other[0]!r} (train_unembed=True) is not supported by the "
                "vLLM sampler backend (vLLM adapts an unembedding only when the model names it lm_head); train with "
                "train_unembed=False, or run tinkerd with --sampler builtin"
            )


def request_body(job: SampleJob, model: str) -> dict[str, Any]:
    params = job.params
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(job.prompt),
        "n": job.num_samples,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "logprobs": job.topk_sample_logprobs,  # 0: the sampled token's own logprob only
        "ignore_eos": True,
        "stop": list(params.stop_strings),
        "stop_token_ids": list(params.stop_token_ids),
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if job.prompt_logprobs or job.topk_prompt_logprobs > 0:
        body["prompt_logprobs"] = job.topk_prompt_logprobs
    return body


def _token_id(key: str) -> int:
    return int(key[len(_TOKEN_PREFIX) :]) if key.startswith(_TOKEN_PREFIX) else int(key)


def _stop_reason(finish_reason: object) -> StopReason:
    if finish_reason == "length":
        return "length"
    if finish_reason == "stop":
        return "stop"
    raise RuntimeError(f"vLLM ended a sample with finish_reason {finish_reason!r}")


def _sequence(choice: dict[str, Any], k: int) -> SampledSequence:
    tokens = [int(t) for t in choice["token_ids"]]
    logprobs_block = choice.get("logprobs") or {}
    logprobs = [float(v) for v in logprobs_block.get("token_logprobs") or []]
    if len(logprobs) != len(tokens):
        raise RuntimeError(f"vLLM returned {len(tokens)} tokens but {len(logprobs)} logprobs")
    topk: list[TopkRow] | None = None
    if k > 0:
        topk = []
        for entry in logprobs_block.get("top_logprobs") or []:
            pairs = sorted(((_token_id(key), float(v)) for key, v in (entry or {}).items()), key=lambda p: -p[1])
            topk.append(pairs[:k])
    return SampledSequence(tokens, logprobs, _stop_reason(choice.get("finish_reason")), topk)


def _prompt_answers(
    job: SampleJob, rows: list[dict[str, Any] | None]
) -> tuple[list[float | None] | None, list[TopkRow | None] | None]:
    """vLLM's prompt_logprobs rows ({token id: {logprob, rank, ...}}, the first None) as tinkerd's two lists."""
    if len(rows) != len(job.prompt):
        raise RuntimeError(f"vLLM returned {len(rows)} prompt logprob rows for a {len(job.prompt)}-token prompt")
    first = 1 if job.prompt_logprobs_last_n is None else len(job.prompt) - job.prompt_logprobs_last_n
    chosen: list[float | None] = [None] * len(job.prompt)
    topk: list[TopkRow | None] = [None] * len(job.prompt)
    k = job.topk_prompt_logprobs
    for i in range(max(first, 1), len(job.prompt)):
        row = rows[i] or {}
        entries = {_token_id(key): value for key, value in row.items()}
        own = entries.get(job.prompt[i])
        chosen[i] = float(own["logprob"]) if own is not None else None
        if k > 0:
            ranked = sorted(
                ((t, v) for t, v in entries.items() if int(v.get("rank", k + 1)) <= k), key=lambda p: p[1]["rank"]
            )
            topk[i] = [(t, float(v["logprob"])) for t, v in ranked]
    return (chosen if job.prompt_logprobs else None), (topk if k > 0 else None)


def parse_response(job: SampleJob, response: dict[str, Any]) -> SampleResult:
    choices = sorted(response.get("choices") or [], key=lambda c: int(c.get("index", 0)))
    if len(choices) != job.num_samples:
        raise RuntimeError(f"vLLM returned {len(choices)} of {job.num_samples} samples")
    sequences = [_sequence(c, job.topk_sample_logprobs) for c in choices]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt: list[TopkRow | None] | None = None
    if job.prompt_logprobs or job.topk_prompt_logprobs > 0:
        rows = choices[0].get("prompt_logprobs") or response.get("prompt_logprobs")
        if rows is None:
            raise RuntimeError("vLLM returned no prompt logprobs")
        prompt_logprobs, topk_prompt = _prompt_answers(job, rows)
    return SampleResult(sequences=sequences, prompt_logprobs=prompt_logprobs, topk_prompt_logprobs=topk_prompt)


def adapter_of(job: SampleJob) -> LoraWeights | None:
    return job.weights
