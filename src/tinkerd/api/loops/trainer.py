"""The trainer routes under a run's ``base_url`` (``/loops/trainers/<run_id>``): health, policy_version, the
operations (init_trainer_server, forward, forward_backward, optim_step, save_state, save_weights_for_sampler,
load_state[_with_optimizer]) and the long-poll of their results.

Every op is a request of the run in the shared ledger, numbered by the SDK's ``seq_id`` (1 for init_trainer_server;
the run's create is seq 0), so a retried submit finds its request instead of running it twice, and the Tinker API
sees the same run. A refused op fills its seq_id so the run's later ops do not wait for it.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Response

from tinkerd.api.context import ApiContext
from tinkerd.api.loops import convert, operations, schemas
from tinkerd.api.loops.common import TRAINER_PREFIX, Context, Owner, from_bt
from tinkerd.api.routes.common import JSON, fill_refused_seq, image_rules, submit
from tinkerd.domain.errors import CapacityError, InvalidRequestError, NotFoundError, TinkerdError
from tinkerd.domain.ids import validate_run_id
from tinkerd.domain.records import RequestKind, TrainingRun
from tinkerd.domain.requests import LoadWeights, ResetAdapter
from tinkerd.domain.requests import Request as DomainRequest

router = APIRouter(prefix=TRAINER_PREFIX + "/{run_id}")


def _run(ctx: ApiContext, owner: str, run_id: str) -> TrainingRun:
    return ctx.runs.get(validate_run_id(run_id), owner, ctx.store.runs.get)


def _submit_op(
    ctx: ApiContext,
    owner: str,
    run_id: str,
    body: schemas.OpBody,
    kind: RequestKind,
    build: Callable[[TrainingRun], DomainRequest],
    *,
    skip_normalization: bool = False,
) -> Response:
    """Check and convert an op of an existing run, record it in the ledger, answer 202 with its operation id."""
    run = _run(ctx, owner, run_id)
    try:
        if body.run_id is not None and body.run_id != run.id:
            raise InvalidRequestError(f"the body names run {body.run_id!r} but the URL is run {run.id!r}'s")
        request = build(run)
    except TinkerdError as error:
        if not isinstance(error, CapacityError):
            fill_refused_seq(ctx, owner, run.id, body.seq_id, kind, str(error))
        raise
    token_count = sum(len(d.tokens) for d in getattr(request, "datums", ()))
    record = submit(
        ctx, owner, model_id=run.id, seq_id=body.seq_id, kind=kind, payload=request, token_count=token_count
    )
    return operations.accepted(record.request_id, skip_normalization=skip_normalization)


@router.get("/health")
def health(run_id: str, ctx: Context, owner: Owner, base_model: str | None = None) -> Response:
    run = _run(ctx, owner, run_id)
    if base_model is not None and base_model != run.base_model:
        raise NotFoundError(f"run {run.id} trains {run.base_model!r}, not {base_model!r}")
    # The SDK pings /health every 60 s while a TrainingClient lives: that is the session's heartbeat (a session
    # silent for long is timed out and its runs freed).
    ctx.store.sessions.heartbeat(run.session_id, owner)
    return Response('{"status":"ok"}', media_type=JSON)


@router.get("/policy_version")
def policy_version(run_id: str, ctx: Context, owner: Owner) -> Response:
    """Answered 501 (the SDK's NotImplementedError): tinkerd's samplers are pinned to checkpoints, not to a live
    adapter's version (the SDK asks only trainers with a dedicated deployment, which tinkerd never hands out)."""
    run = _run(ctx, owner, run_id)
    message = f"run {run.id} has no live policy version: tinkerd samples saved checkpoints (pinned by path)"
    return Response(f'{{"error":"{message}","detail":"{message}"}}', status_code=501, media_type=JSON)


@router.post("/init_trainer_server")
def init_trainer_server(run_id: str, body: schemas.InitTrainerServerRequest, ctx: Context, owner: Owner) -> Response:
    def build(run: TrainingRun) -> DomainRequest:
        if body.lora_rank is not None and body.lora_rank != run.lora.rank:
            raise InvalidRequestError(f"run {run.id} was created with LoRA rank {run.lora.rank}, not {body.lora_rank}")
        return ResetAdapter(run_id=run.id)

    return _submit_op(ctx, owner, run_id, body, RequestKind.RESET_ADAPTER, build)


def _forward_backward(
    ctx: ApiContext, body: schemas.ForwardBackwardRequest, run: TrainingRun, backward: bool
) -> DomainRequest:
    model = ctx.model(run.base_model)
    return convert.forward_backward(body, run.id, model, backward=backward, rules=image_rules(ctx, model))


def _forward(
    run_id: str, body: schemas.ForwardBackwardRequest, ctx: ApiContext, owner: str, backward: bool
) -> Response:
    kind = RequestKind.FORWARD_BACKWARD if backward else RequestKind.FORWARD
    return _submit_op(
        ctx, owner, run_id, body, kind,
        lambda run: _forward_backward(ctx, body, run, backward),
        skip_normalization=convert.skips_normalization(body.loss_fn_config),
    )  # fmt: skip


@router.post("/forward_backward")
def forward_backward(run_id: str, body: schemas.ForwardBackwardRequest, ctx: Context, owner: Owner) -> Response:
    return _forward(run_id, body, ctx, owner, backward=True)


@router.post("/forward")
def forward(run_id: str, body: schemas.ForwardBackwardRequest, ctx: Context, owner: Owner) -> Response:
    return _forward(run_id, body, ctx, owner, backward=False)


@router.post("/optim_step")
def optim_step(run_id: str, body: schemas.OptimStepRequest, ctx: Context, owner: Owner) -> Response:
    return _submit_op(ctx, owner, run_id, body, RequestKind.OPTIM_STEP, lambda run: convert.optim_step(body, run.id))


@router.post("/save_state")
def save_state(run_id: str, body: schemas.SaveRequest, ctx: Context, owner: Owner) -> Response:
    return _submit_op(
        ctx, owner, run_id, body, RequestKind.SAVE_WEIGHTS, lambda run: convert.save(body, run.id, for_sampler=False)
    )


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(run_id: str, body: schemas.SaveRequest, ctx: Context, owner: Owner) -> Response:
    kind = RequestKind.SAVE_WEIGHTS_FOR_SAMPLER
    return _submit_op(ctx, owner, run_id, body, kind, lambda run: convert.save(body, run.id, for_sampler=True))


def _load(run_id: str, body: schemas.LoadStateRequest, ctx: ApiContext, owner: str, with_optimizer: bool) -> Response:
    def build(run: TrainingRun) -> DomainRequest:
        path = from_bt(body.path)
        if path.kind != "weights":
            raise InvalidRequestError(
                f"{body.path} is a sampler checkpoint; load_state needs a bt://loops:<run>/weights/<name> path "
                "(saved with save_state)"
            )
        ctx.store.checkpoints.get(path, owner)  # 404 unless the caller may read it
        source = ctx.store.runs.get(path.run_id, owner, accessible=True)
        if source.base_model != run.base_model:
            raise InvalidRequestError(
                f"{body.path} was trained on {source.base_model!r}; run {run.id} trains {run.base_model!r}"
            )
        return LoadWeights(run_id=run.id, path=str(path), with_optimizer=with_optimizer)

    return _submit_op(ctx, owner, run_id, body, RequestKind.LOAD_WEIGHTS, build)


@router.post("/load_state")
def load_state(run_id: str, body: schemas.LoadStateRequest, ctx: Context, owner: Owner) -> Response:
    return _load(run_id, body, ctx, owner, with_optimizer=False)


@router.post("/load_state_with_optimizer")
def load_state_with_optimizer(run_id: str, body: schemas.LoadStateRequest, ctx: Context, owner: Owner) -> Response:
    return _load(run_id, body, ctx, owner, with_optimizer=True)


@router.get("/operations/{operation_id}")
async def get_operation(run_id: str, operation_id: str, ctx: Context, owner: Owner) -> Response:
    return await operations.poll(ctx, owner, operation_id, validate_run_id(run_id), operations.trainer_result)
