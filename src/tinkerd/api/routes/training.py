"""Training runs: create_model, get_info, forward_backward / forward, optim_step, weights saving and loading.

Every route checks what it can at submit time (the run exists and is the caller's, the base model is served, ids
and paths are well formed, tokens fit the vocabulary) so that most mistakes are a 4xx at once rather than a failed
future later; the worker checks the rest when the request runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from tinkerd.api import schemas
from tinkerd.api.context import ApiContext
from tinkerd.api.convert import requests as convert
from tinkerd.api.convert import results
from tinkerd.api.convert.forward_backward import (
    ForwardBackwardCall,
    check_forward_backward,
    forward_backward_from_json,
    forward_backward_from_proto,
    parse_forward_backward_proto,
)
from tinkerd.api.images import ImageRules
from tinkerd.api.routes.common import (
    PROTOBUF,
    Context,
    Owner,
    admit,
    check_run_cap,
    fill_refused_seq,
    future_response,
    image_rules,
    in_thread,
    json_response,
    submit,
)
from tinkerd.domain.errors import CapacityError, InvalidRequestError, NotFoundError, TinkerdError
from tinkerd.domain.ids import validate_run_id
from tinkerd.domain.records import FIRST_SEQ_ID, RequestKind, TrainingRun, utc_now
from tinkerd.domain.requests import Request as DomainRequest
from tinkerd.domain.requests import UnloadModel

M = TypeVar("M", bound=BaseModel)

router = APIRouter()


def _run(ctx: ApiContext, owner: str, model_id: str) -> TrainingRun:
    return ctx.store.runs.get(validate_run_id(model_id), owner)


@contextmanager
def _refusing_fills_the_seq(
    ctx: ApiContext, owner: str, run: TrainingRun, seq_id: int | None, kind: RequestKind
) -> Iterator[None]:
    """Around the checks of a request to an existing run: if they refuse it (a 4xx), record its seq_id as failed.

    The SDK numbered the request before sending it and numbers the next one after it; the ledger runs a model's
    requests strictly in seq_id order, so a seq_id that never reaches the ledger would stall the run forever.
    Database trouble (CapacityError, a 429) is left alone: the SDK retries the same seq_id.
    """
    try:
        yield
    except TinkerdError as error:
        if seq_id is not None and not isinstance(error, CapacityError):
            fill_refused_seq(ctx, owner, run.id, seq_id, kind, str(error))
        raise


# last_request_time (REST view) is refreshed at most this often: the write competes with the worker's claims for
# SQLite's write lock, and costs a 1-datum forward more than everything else the API does for it.
_TOUCH_EVERY = timedelta(seconds=5)


def _accepted(ctx: ApiContext, run: TrainingRun) -> None:
    now = utc_now()
    if ctx.runs.touch_due(run.id, run.last_request_at, now, _TOUCH_EVERY):
        ctx.store.runs.touch(run.id, run.owner, now)


def _submit_to_run(
    ctx: ApiContext,
    owner: str,
    model_id: str,
    seq_id: int | None,
    kind: RequestKind,
    build: Callable[[TrainingRun], tuple[DomainRequest, int]],
) -> Response:
    """Check and convert a request to an existing run (``build`` returns it and its token count), then submit it.

    A refusal inside ``build`` still fills the run's seq_id (see _refusing_fills_the_seq)."""
    run = ctx.runs.get(validate_run_id(model_id), owner, ctx.store.runs.get)
    with _refusing_fills_the_seq(ctx, owner, run, seq_id, kind):
        request, token_count = build(run)
    record = submit(ctx, owner, model_id=run.id, seq_id=seq_id, kind=kind, payload=request, token_count=token_count)
    _accepted(ctx, run)
    return future_response(schemas.UntypedAPIFuture(request_id=record.request_id, model_id=run.id))


def _admit_new_run(ctx: ApiContext, owner: str, run_id: str, kind: RequestKind) -> None:
    """The caps, checked before a new run's row exists (a refused run leaves nothing behind). A retry of a run
    already created passes the run cap, and the queue cap as a repeat of its seq 0."""
    try:
        ctx.store.runs.get(run_id, owner)
    except NotFoundError:
        check_run_cap(ctx, owner)
    admit(ctx, owner, run_id, FIRST_SEQ_ID, kind)


@router.post("/create_model")
def create_model(body: schemas.CreateModelRequest, ctx: Context, owner: Owner) -> Response:
    run, request = convert.create_model(body, owner, utc_now(), ctx.model(body.base_model))
    _admit_new_run(ctx, owner, run.id, RequestKind.CREATE_MODEL)
    # The row exists from submit on, so get_info and the REST views see the run before the worker has built it.
    run = ctx.store.runs.create(run, exist_ok=True)
    ctx.dispatch.place(run.id, run.base_model)
    record = submit(
        ctx, owner, model_id=run.id, seq_id=FIRST_SEQ_ID, kind=RequestKind.CREATE_MODEL, payload=request,
        admitted=True,
    )  # fmt: skip
    return future_response(schemas.UntypedAPIFuture(request_id=record.request_id, model_id=run.id))


@router.post("/get_info")
def get_info(body: schemas.GetInfoRequest, ctx: Context, owner: Owner) -> Response:
    run = _run(ctx, owner, body.model_id)
    return json_response(results.get_info(run, ctx.models.get(run.base_model)))


# -- forward / backward ------------------------------------------------------------------------------------------------


def _parse_json(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        # The same 400 as for bodies FastAPI parses itself.
        raise RequestValidationError(error.errors()) from None


def _submit_forward(
    ctx: ApiContext, owner: str, model_id: str, seq_id: int | None, forward_only: bool,
    convert_call: Callable[[ImageRules], ForwardBackwardCall],
) -> Response:  # fmt: skip
    def build(run: TrainingRun) -> tuple[DomainRequest, int]:
        model = ctx.model(run.base_model)
        call = convert_call(image_rules(ctx, model))
        check_forward_backward(call, model)
        return call.request, call.token_count

    kind = RequestKind.FORWARD if forward_only else RequestKind.FORWARD_BACKWARD
    return _submit_to_run(ctx, owner, model_id, seq_id, kind, build)


def _forward_backward(ctx: ApiContext, owner: str, body: bytes, content_type: str) -> Response:
    if PROTOBUF in content_type:
        message = parse_forward_backward_proto(body)
        return _submit_forward(
            ctx, owner, message.model_id, message.seq_id, message.forward_only,
            lambda rules: forward_backward_from_proto(message, rules),
        )  # fmt: skip
    parsed = _parse_json(schemas.ForwardBackwardJsonRequest, body)
    data, model_id, seq_id = parsed.forward_backward_input, parsed.model_id, parsed.seq_id
    return _submit_forward(
        ctx, owner, model_id, seq_id, False,
        lambda rules: forward_backward_from_json(data, model_id, seq_id, backward=True, rules=rules),
    )  # fmt: skip


def _forward(ctx: ApiContext, owner: str, body: bytes) -> Response:
    parsed = _parse_json(schemas.ForwardJsonRequest, body)
    data, model_id, seq_id = parsed.forward_input, parsed.model_id, parsed.seq_id
    return _submit_forward(
        ctx, owner, model_id, seq_id, True,
        lambda rules: forward_backward_from_json(data, model_id, seq_id, backward=False, rules=rules),
    )  # fmt: skip


@router.post("/forward_backward")
async def forward_backward(request: Request, ctx: Context, owner: Owner) -> Response:
    """Protobuf from SDK 0.25 on (``forward_only`` makes it a forward); JSON from older SDKs."""
    body = await request.body()
    return await in_thread(_forward_backward, ctx, owner, body, request.headers.get("content-type", ""))


@router.post("/forward")
async def forward(request: Request, ctx: Context, owner: Owner) -> Response:
    """JSON forward of SDKs before 0.25 (newer ones send /forward_backward with forward_only)."""
    body = await request.body()
    return await in_thread(_forward, ctx, owner, body)


# -- optimizer and weights ---------------------------------------------------------------------------------------------


@router.post("/optim_step")
def optim_step(body: schemas.OptimStepRequest, ctx: Context, owner: Owner) -> Response:
    return _submit_to_run(
        ctx, owner, body.model_id, body.seq_id, RequestKind.OPTIM_STEP, lambda _run: (convert.optim_step(body), 0)
    )


@router.post("/save_weights")
def save_weights(body: schemas.SaveWeightsRequest, ctx: Context, owner: Owner) -> Response:
    return _submit_to_run(
        ctx, owner, body.model_id, body.seq_id, RequestKind.SAVE_WEIGHTS, lambda _run: (convert.save_weights(body), 0)
    )


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(body: schemas.SaveWeightsForSamplerRequest, ctx: Context, owner: Owner) -> Response:
    """Named: a sampler checkpoint on disk. Unnamed with sampling_session_seq_id: an in-memory sampler of the run."""

    def build(run: TrainingRun) -> tuple[DomainRequest, int]:
        if body.path:
            return convert.save_sampler_weights(body), 0
        if body.sampling_session_seq_id is not None:
            sampler, request = convert.snapshot_sampler(body, run, utc_now())
            # Created at submit, like runs, so the sampler id is known (and unique) before the snapshot is taken.
            ctx.store.samplers.create(sampler, exist_ok=True)
            return request, 0
        raise InvalidRequestError("save_weights_for_sampler needs a path (a name) or a sampling_session_seq_id")

    return _submit_to_run(ctx, owner, body.model_id, body.seq_id, RequestKind.SAVE_WEIGHTS_FOR_SAMPLER, build)


@router.post("/save_weights_external")
def save_weights_external(body: schemas.SaveWeightsExternalRequest, ctx: Context, owner: Owner) -> Response:
    """The adapter as a PEFT directory under external_weights/<name>, downloaded through external_weights_urls."""
    kind = RequestKind.SAVE_WEIGHTS_EXTERNAL
    return _submit_to_run(
        ctx, owner, body.model_id, body.seq_id, kind, lambda _run: (convert.save_external_weights(body), 0)
    )


@router.post("/load_weights")
def load_weights(body: schemas.LoadWeightsRequest, ctx: Context, owner: Owner) -> Response:
    """Into an existing run (``model_id``), or into a new run ``<session_id>:train:<model_seq_id>`` that the SDK
    names itself (create_training_client_from_state)."""
    kind = RequestKind.LOAD_WEIGHTS
    if body.model_id is not None:

        def build(run: TrainingRun) -> tuple[DomainRequest, int]:
            source = _checkpoint_run(ctx, owner, body.path)
            if source.base_model != run.base_model:
                raise InvalidRequestError(
                    f"{body.path} was trained on {source.base_model!r}; run {run.id} trains {run.base_model!r}"
                )
            return convert.load_weights(body, run.id), 0

        return _submit_to_run(ctx, owner, body.model_id, body.seq_id, kind, build)
    if body.session_id is None or body.model_seq_id is None:
        raise InvalidRequestError("load_weights needs model_id, or session_id and model_seq_id to create a run")
    # A new run: nothing is numbered after its seq 0 until this succeeds, so a refusal here leaves no gap.
    source = _checkpoint_run(ctx, owner, body.path)
    ctx.model(source.base_model)  # the checkpoint's base model must be served here
    new_run, request = convert.create_via_load(body, source, owner, utc_now())
    _admit_new_run(ctx, owner, new_run.id, kind)
    new_run = ctx.store.runs.create(new_run, exist_ok=True)
    ctx.dispatch.place(new_run.id, new_run.base_model)
    record = submit(ctx, owner, model_id=new_run.id, seq_id=FIRST_SEQ_ID, kind=kind, payload=request, admitted=True)
    return future_response(schemas.UntypedAPIFuture(request_id=record.request_id, model_id=new_run.id))


def _checkpoint_run(ctx: ApiContext, owner: str, path: str) -> TrainingRun:
    """The run that saved a weights/ checkpoint the caller may read (404 otherwise)."""
    checkpoint = ctx.store.checkpoints.get(convert.weights_path(path), owner)
    return ctx.store.runs.get(checkpoint.run_id, owner, accessible=True)


@router.post("/unload_model")
def unload_model(body: schemas.UnloadModelRequest, ctx: Context, owner: Owner) -> Response:
    """Free a run's adapter and optimizer state (no SDK calls this; sessions that end free their runs anyway).

    The request carries no seq_id, so it does not wait for the run's queued requests: those fail as not loaded.
    """
    run = _run(ctx, owner, body.model_id)
    request = UnloadModel(run_id=run.id)
    record = submit(ctx, owner, model_id=run.id, seq_id=None, kind=RequestKind.UNLOAD_MODEL, payload=request)
    return future_response(schemas.UntypedAPIFuture(request_id=record.request_id, model_id=run.id))
