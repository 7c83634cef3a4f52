"""The sampler routes under a sampler's ``base_url`` (``/loops/samplers/<sampler_id>``): ``/sample`` in vLLM's
completions format, its operations, and ``/v1/models``.

Samplers are "serverless" in the SDK's terms: ``/sample`` answers 202 with an operation and the completion comes
from its poll. What a sample serves, in order:

- ``X-Checkpoint-Path`` (or the body's ``lora``): exactly that checkpoint (the pinning the SDK's serverless clients
  use: ``save_weights_and_get_sampling_client``, ``create_sampling_client(model_path=)``);
- else ``X-Min-Policy-Version: N`` (with ``X-Run-Id``): the run's newest sampler checkpoint, a version floor: every
  save the SDK learned N from made one, so the newest is at least N; 408 (which the SDK retries) while there is none;
- else the sampler's own checkpoint, or its base model.

Each distinct checkpoint gets its own sampler row in the ledger (``<sampler>:<digest>``), which the worker loads
as it loads a Tinker sampler of a checkpoint.

A prompt with an image comes as ``model_input_chunks`` (text and ``image`` chunks, ``prompt`` empty) with
``return_token_ids``: the chunks are laid out as the Tinker API lays a model input (``api.images``: an image becomes
its placeholder tokens, a bad image is a 400), and each choice answers ``prompt_token_ids``, the prompt as sampled.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response

from tinkerd.api.context import ApiContext, ServedModelInfo
from tinkerd.api.convert.tensors import check_tokens
from tinkerd.api.loops import convert, operations, schemas
from tinkerd.api.loops.common import SAMPLER_PREFIX, Context, Owner, from_bt, to_bt
from tinkerd.api.routes.common import JSON, image_rules, in_thread, submit
from tinkerd.domain import ops
from tinkerd.domain.errors import InvalidRequestError, TinkerdError
from tinkerd.domain.ids import validate_run_id, validate_sampler_id
from tinkerd.domain.paths import TinkerPath, parse_tinker_path
from tinkerd.domain.records import FutureRecord, RequestKind, Sampler, utc_now
from tinkerd.domain.requests import Result, Sample

router = APIRouter(prefix=SAMPLER_PREFIX + "/{sampler_id}")

MAX_NUM_SAMPLES = 256
DEFAULT_MAX_TOKENS = 16
MAX_SEQ_ID = 2**63 - 1


class BehindFloorError(TinkerdError):
    """The sampler has nothing at the asked version yet (answered 408, which the SDK retries)."""


def _sampler(ctx: ApiContext, owner: str, sampler_id: str) -> Sampler:
    return ctx.store.samplers.get(validate_sampler_id(sampler_id), owner)


def _pinned(ctx: ApiContext, owner: str, sampler: Sampler, request: Request, body: schemas.SampleRequest) -> Sampler:
    """The sampler row that serves this request's checkpoint (see the module docstring)."""
    named = request.headers.get("x-checkpoint-path") or body.lora
    path: TinkerPath | None = None
    if named:
        path = from_bt(named)
        ctx.store.checkpoints.get(path, owner)  # 404 unless the caller may read it
    elif request.headers.get("x-min-policy-version") is not None:
        run_id = request.headers.get("x-run-id")
        if not run_id:
            raise InvalidRequestError("X-Min-Policy-Version needs X-Run-Id: the run whose versions it counts")
        run = ctx.store.runs.get(validate_run_id(run_id), owner)
        latest = ctx.store.checkpoints.latest(run.id, owner, "sampler_weights")
        if latest is None:
            raise BehindFloorError(f"run {run.id} has saved no sampler weights yet")
        path = latest.path
    if path is None:
        return sampler
    if sampler.model_path == str(path):
        return sampler
    base_model = ctx.store.runs.get(path.run_id, owner, accessible=True).base_model
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    pinned = Sampler(
        id=f"{sampler.id}:{digest}", session_id=sampler.session_id, owner=owner, base_model=base_model,
        created_at=utc_now(), model_path=str(path),
    )  # fmt: skip
    return ctx.store.samplers.create(pinned, exist_ok=True)


def _prompt(
    body: schemas.SampleRequest, model: ServedModelInfo, ctx: ApiContext
) -> tuple[list[int], list[ops.ImageInput]]:
    """The prompt's token ids and images: ``prompt``, or ``model_input_chunks`` (text and image chunks, which the
    SDK sends instead when a prompt holds an image) laid end to end as the Tinker API lays a model input."""
    if body.model_input_chunks is None:
        prompt, images, where = list(body.prompt), [], "prompt"
    elif body.prompt:
        raise InvalidRequestError("send the prompt as prompt or as model_input_chunks, not both")
    else:
        chunks = schemas.ModelInput(chunks=body.model_input_chunks)
        built = convert.model_input("model_input_chunks", chunks, image_rules(ctx, model))
        prompt, images, where = built.tokens, built.images, "model_input_chunks"
    check_tokens(prompt, where, model.vocab_size, model.max_context_length)
    return prompt, images


def _sample_request(body: schemas.SampleRequest, sampler: Sampler, ctx: ApiContext) -> Sample:
    model = ctx.model(sampler.base_model)
    if body.structured_outputs:
        raise InvalidRequestError("structured_outputs is not supported by tinkerd yet; sample without it")
    prompt, images = _prompt(body, model, ctx)
    if not 1 <= body.n <= MAX_NUM_SAMPLES:
        raise InvalidRequestError(f"n must be between 1 and {MAX_NUM_SAMPLES}, got {body.n}")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    if max_tokens < 1 or len(prompt) + max_tokens > model.max_context_length:
        raise InvalidRequestError(
            f"max_tokens must be >= 1 and prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) within the "
            f"model's context of {model.max_context_length} tokens"
        )
    stop_strings: tuple[str, ...] = ()
    stop_ids = model.eos_token_ids
    if isinstance(body.stop, str):
        stop_strings = (body.stop,)
    elif body.stop:
        stop_strings = tuple(body.stop)
    if body.stop_token_ids:
        stop_ids = tuple(dict.fromkeys((*body.stop_token_ids, *model.eos_token_ids)))
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else -1
    params = ops.SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=top_k, seed=body.seed,
        stop_strings=stop_strings, stop_token_ids=stop_ids,
    )  # fmt: skip
    k = body.prompt_logprobs
    if k is not None and k < 0:
        raise InvalidRequestError(f"prompt_logprobs must be >= 0, got {k}")
    return Sample(
        sampler_id=sampler.id, prompt=prompt, num_samples=body.n, params=params,
        prompt_logprobs=k is not None, topk_prompt_logprobs=k or 0, images=images,
    )  # fmt: skip


def _seq_id(request: Request) -> int | None:
    """The Idempotency-Key as a ledger seq_id, so a resent /sample finds the request it already made."""
    key = request.headers.get("idempotency-key")
    if not key:
        return None
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & MAX_SEQ_ID


@router.post("/sample")
async def sample(
    sampler_id: str, body: schemas.SampleRequest, request: Request, ctx: Context, owner: Owner
) -> Response:
    """A serverless client (it names the ``model``) gets 202 and an operation to poll; a dedicated or local one
    (``ServiceClient.local``, no ``model``) expects the completion itself in a 200, as a vLLM server answers."""
    submitted = await in_thread(_submit_sample, sampler_id, body, request, ctx, owner)
    if isinstance(submitted, Response):
        return submitted
    if body.model is not None:
        return operations.accepted(submitted)
    render = _completions(_memo(request), submitted)
    return await operations.result_now(ctx, owner, submitted, validate_sampler_id(sampler_id), render)


def _submit_sample(
    sampler_id: str, body: schemas.SampleRequest, request: Request, ctx: ApiContext, owner: str
) -> str | Response:
    """The sample's request id in the ledger, or the 408 of a version floor not reached yet."""
    sampler = _sampler(ctx, owner, sampler_id)
    try:
        serving = _pinned(ctx, owner, sampler, request, body)
    except BehindFloorError as error:
        message = str(error)
        return Response(json.dumps({"error": message, "detail": message}), status_code=408, media_type=JSON)
    payload = _sample_request(body, serving, ctx)
    token_count = len(payload.prompt) + payload.params.max_tokens * payload.num_samples
    record = submit(
        ctx, owner, model_id=serving.id, seq_id=_seq_id(request), kind=RequestKind.SAMPLE, payload=payload,
        token_count=token_count,
    )  # fmt: skip
    if payload.prompt_logprobs or body.return_token_ids:
        _memo(request).keep(record.request_id, payload.prompt)
    return record.request_id


class PromptMemo:
    """The prompts of recent samples that asked for prompt logprobs: vLLM's answer keys them by token id, and the
    ledger drops a request's payload once it has run. In memory, bounded; after a restart such an answer has its
    prompt logprobs without the token ids (the SDK then reads them as missing)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._prompts: OrderedDict[str, list[int]] = OrderedDict()
        self._capacity = capacity

    def keep(self, request_id: str, prompt: list[int]) -> None:
        self._prompts[request_id] = prompt
        self._prompts.move_to_end(request_id)
        while len(self._prompts) > self._capacity:
            self._prompts.popitem(last=False)

    def get(self, request_id: str) -> list[int]:
        return self._prompts.get(request_id, [])


def _memo(request: Request) -> PromptMemo:
    state = request.app.state
    if not hasattr(state, "loops_prompts"):
        state.loops_prompts = PromptMemo()
    return state.loops_prompts


@router.get("/operations/{operation_id}")
async def get_operation(sampler_id: str, operation_id: str, request: Request, ctx: Context, owner: Owner) -> Response:
    render = _completions(_memo(request), operation_id)
    return await operations.poll(ctx, owner, operation_id, validate_sampler_id(sampler_id), render)


def _completions(memo: PromptMemo, operation_id: str) -> Callable[[FutureRecord, Result, bool], dict[str, Any]]:
    """How a finished sample is rendered: vLLM's completions JSON, prompt logprobs keyed by the prompt's tokens."""

    def render(record: FutureRecord, result: Result, _skip: bool) -> dict[str, Any]:
        if not isinstance(result, ops.SampleResult):
            raise InvalidRequestError(f"operation {operation_id!r} is not a sample")
        prompt = memo.get(record.request_id)
        answer = convert.sample_completions(result, prompt)
        if prompt:  # asked for (return_token_ids): the prompt as sampled, images laid out as their tokens
            for choice in answer["choices"]:
                choice.setdefault("prompt_token_ids", prompt)
        return answer

    return render


@router.post("/operations/{operation_id}/cancel")
def cancel_operation(sampler_id: str, operation_id: str, ctx: Context, owner: Owner) -> Response:
    """Accepted and ignored: a sample already queued runs to its end (its result is dropped later, unread)."""
    _sampler(ctx, owner, sampler_id)
    del operation_id
    return Response("{}", media_type=JSON)


@router.get("/v1/models")
def models(sampler_id: str, ctx: Context, owner: Owner) -> Response:
    """The base model (``parent`` null) and, for a sampler of a checkpoint, that adapter."""
    sampler = _sampler(ctx, owner, sampler_id)
    data: list[dict[str, str | None]] = [{"id": sampler.base_model, "object": "model", "parent": None}]
    if sampler.model_path:
        data.append(
            {"id": to_bt(parse_tinker_path(sampler.model_path)), "object": "model", "parent": sampler.base_model}
        )
    return Response(json.dumps({"object": "list", "data": data}), media_type=JSON)
