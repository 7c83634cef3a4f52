"""The Loops control plane (``/v1/loops``): sessions, trainers (runs), samplers, checkpoints and capabilities.

Baseten provisions GPUs behind these calls; tinkerd has them already, so a create answers at once with the
``base_url`` of the run's trainer routes or of the sampler's routes on this same server. Runs and checkpoints are the
ones the Tinker API and the ``tinker`` CLI list.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from tinkerd.api.context import ApiContext
from tinkerd.api.loops import schemas
from tinkerd.api.loops.common import (
    CONTROL_PREFIX,
    Context,
    Owner,
    checkpoint_id,
    from_bt,
    path_of_checkpoint_id,
    sampler_url,
    trainer_url,
)
from tinkerd.api.loops.convert import checkpoint_kind_target
from tinkerd.api.routes.common import JSON, admit, check_run_cap, submit
from tinkerd.domain import ops
from tinkerd.domain.errors import ConflictError, InvalidRequestError
from tinkerd.domain.ids import new_session_id, training_run_id, validate_run_id, validate_session_id
from tinkerd.domain.records import FIRST_SEQ_ID, Checkpoint, RequestKind, Sampler, Session, TrainingRun, utc_now
from tinkerd.domain.requests import CreateModel

router = APIRouter(prefix=CONTROL_PREFIX)

FILE_PURPOSE = "file"  # the download route's signature purpose (api.routes.downloads)
MAX_PAGE_SIZE = 1000


def _json(body: str, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type=JSON)


@router.post("/sessions")
def create_session(ctx: Context, owner: Owner) -> Response:
    now = utc_now()
    session = ctx.store.sessions.create(
        Session(id=new_session_id(), owner=owner, created_at=now, last_heartbeat_at=now, sdk_version="baseten-loops")
    )
    return _json(f'{{"session":{{"id":"{session.id}"}}}}')


# -- trainers ----------------------------------------------------------------------------------------------------------


def _new_run(ctx: ApiContext, owner: str, body: schemas.CreateTrainerRequest) -> TrainingRun:
    """A run `<session>:train:<n>` with the next free n; the run cap is checked before its row exists."""
    session = ctx.store.sessions.get(validate_session_id(body.session_id), owner)
    if session.closed:
        raise InvalidRequestError(f"session {session.id} is {session.status.replace('_', ' ')}; create a new one")
    model = ctx.model(body.base_model)
    if not model.trainable:
        raise InvalidRequestError(f"base model {model.name!r} is served for sampling only")
    if body.base_checkpoint is not None:
        raise InvalidRequestError("base_checkpoint is not supported: tinkerd trains LoRA adapters on its served models")
    if not 1 <= body.lora_rank <= ops.MAX_LORA_RANK:
        raise InvalidRequestError(f"lora_rank must be between 1 and {ops.MAX_LORA_RANK}, got {body.lora_rank}")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise InvalidRequestError(f"seed must be between 0 and 2**63 - 1, got {body.seed}")
    # Loops trains attention and MLP, not the unembedding (the shim refuses other combinations).
    lora = ops.LoraConfig(rank=body.lora_rank, seed=body.seed, train_unembed=False)
    check_run_cap(ctx, owner)
    now = utc_now()
    metadata: dict[str, object] = {"loops_name": body.name} if body.name else {}
    for _attempt in range(8):
        seq = len(ctx.store.runs.ids_for_session(session.id, owner))
        run = TrainingRun(
            id=training_run_id(session.id, seq), session_id=session.id, owner=owner, base_model=model.name,
            created_at=now, last_request_at=now, lora=lora, user_metadata=metadata,
        )  # fmt: skip
        try:
            return ctx.store.runs.create(run)
        except ConflictError:
            continue  # another create of this session took that number
    raise ConflictError(f"could not number a new run in session {session.id}; retry")


@router.post("/trainers")
def create_trainer(body: schemas.CreateTrainerRequest, request: Request, ctx: Context, owner: Owner) -> Response:
    if body.path is not None:
        source = from_bt(body.path)
        ctx.store.checkpoints.get(source, owner)  # a clear 404 now, rather than at load_state
    run = _new_run(ctx, owner, body)
    admit(ctx, owner, run.id, FIRST_SEQ_ID, RequestKind.CREATE_MODEL)
    create = CreateModel(run_id=run.id, base_model=run.base_model, lora=run.lora, user_metadata=run.user_metadata)
    submit(
        ctx, owner, model_id=run.id, seq_id=FIRST_SEQ_ID, kind=RequestKind.CREATE_MODEL, payload=create, admitted=True
    )
    wire = schemas.Run(id=run.id, base_model=run.base_model, base_url=trainer_url(request, run.id))
    return _json('{"run":' + wire.model_dump_json() + "}")


# -- samplers ----------------------------------------------------------------------------------------------------------


@router.post("/samplers")
def create_sampler(body: schemas.CreateSamplerRequest, request: Request, ctx: Context, owner: Owner) -> Response:
    """A run's paired sampler (``run_id``; one per run, created again idempotently), or a standalone sampler of a
    base model or a checkpoint. All are "serverless" in the SDK's terms: each ``/sample`` names the checkpoint it
    wants (an exact snapshot, as Tinker's sampler checkpoints are)."""
    session = ctx.store.sessions.get(validate_session_id(body.session_id), owner)
    model_path: str | None = None
    if body.run_id is not None:
        run = ctx.store.runs.get(validate_run_id(body.run_id), owner)
        sampler_id, base_model = f"{run.id}:sampler", run.base_model
    elif body.model_path is not None:
        path = from_bt(body.model_path)
        ctx.store.checkpoints.get(path, owner)
        base_model = ctx.store.runs.get(path.run_id, owner, accessible=True).base_model
        sampler_id, model_path = f"{session.id}:sampler:{uuid.uuid4().hex[:12]}", str(path)
    elif body.base_model is not None:
        base_model = body.base_model
        sampler_id = f"{session.id}:sampler:{uuid.uuid4().hex[:12]}"
    else:
        raise InvalidRequestError("a sampler needs a run_id, a model_path or a base_model")
    if not ctx.model(base_model).sampleable:
        raise InvalidRequestError(f"base model {base_model!r} is not served for sampling")
    sampler = Sampler(
        id=sampler_id, session_id=session.id, owner=owner, base_model=base_model, created_at=utc_now(),
        model_path=model_path,
    )  # fmt: skip
    ctx.store.samplers.create(sampler, exist_ok=True)
    wire = schemas.Sampler(id=sampler.id, base_url=sampler_url(request, sampler.id))
    return _json('{"sampler":' + wire.model_dump_json() + "}")


# -- checkpoints -------------------------------------------------------------------------------------------------------


def _checkpoint(checkpoint: Checkpoint, run: TrainingRun) -> schemas.Checkpoint:
    path = checkpoint.path
    return schemas.Checkpoint(
        id=checkpoint_id(path),
        run_id=checkpoint.run_id,
        checkpoint_id=checkpoint.name,
        checkpoint_type=checkpoint.kind,
        created_at=checkpoint.created_at,
        base_model=run.base_model,
        lora_adapter_config=schemas.LoraAdapterConfig(r=run.lora.rank),
        size_bytes=checkpoint.size_bytes or 0,
        target="sampler" if checkpoint_kind_target(path) == "sampler" else "trainer",
    )


def _checkpoints_body(items: list[schemas.Checkpoint]) -> Response:
    return _json('{"checkpoints":[' + ",".join(item.model_dump_json() for item in items) + "]}")


@router.get("/checkpoints")
def list_checkpoints(
    ctx: Context, owner: Owner, run_id: str | None = None, checkpoint_path: str | None = None
) -> Response:
    if checkpoint_path is not None:
        path = from_bt(checkpoint_path)
        checkpoint = ctx.store.checkpoints.get(path, owner)
        run = ctx.store.runs.get(path.run_id, owner, accessible=True)
        return _checkpoints_body([_checkpoint(checkpoint, run)])
    if run_id is None:
        raise InvalidRequestError("list checkpoints by run_id or checkpoint_path")
    run = ctx.store.runs.get(validate_run_id(run_id), owner, accessible=True)
    page = ctx.store.checkpoints.list_for_run(run.id, owner, limit=MAX_PAGE_SIZE)
    items = [_checkpoint(c, run) for c in page.items if c.kind in ("weights", "sampler_weights")]
    return _checkpoints_body(items)


@router.get("/checkpoints/{checkpoint_id}/files")
def checkpoint_files(
    checkpoint_id: str,
    request: Request,
    ctx: Context,
    owner: Owner,
    page_size: Annotated[int, Query()] = MAX_PAGE_SIZE,
    page_token: Annotated[int, Query()] = 0,
) -> Response:
    """Signed URLs of the checkpoint's files, sorted by path, ``page_size`` at a time from offset ``page_token``.
    The URLs are the Tinker API's download links: they need no key (the SDK fetches them with no headers)."""
    if not 1 <= page_size <= MAX_PAGE_SIZE or page_token < 0:
        raise InvalidRequestError(
            f"page_size must be between 1 and {MAX_PAGE_SIZE} and page_token >= 0, got {page_size} and {page_token}"
        )
    path = path_of_checkpoint_id(checkpoint_id)
    files, signer = ctx.downloads()
    ctx.store.checkpoints.get(path, owner)
    stored = files.list_files(path)
    expires = signer.expiry(ctx.settings.download_url_ttl_s)
    entries: list[schemas.CheckpointFile] = []
    for item in stored[page_token : page_token + page_size]:
        run_id, kind, name = path.parts()
        url = str(request.url_for("download_file", run_id=run_id, kind=kind, name=name, relpath=item.relpath))
        sig = signer.sign(FILE_PURPOSE, f"{run_id}/{kind}/{name}/{item.relpath}", expires)
        entries.append(
            schemas.CheckpointFile(
                url=f"{url}?expires={expires}&sig={sig}",
                relative_file_name=item.relpath,
                size_bytes=item.size_bytes,
                last_modified=datetime.fromtimestamp(item.modified, UTC),
            )
        )
    end = page_token + len(entries)
    answer = schemas.CheckpointFilesResponse(
        presigned_urls=entries, next_page_token=end if end < len(stored) else None, total_count=len(stored)
    )
    return _json(answer.model_dump_json())


@router.get("/checkpoints/{checkpoint_id}/source")
def checkpoint_source(checkpoint_id: str, ctx: Context, owner: Owner) -> Response:
    ctx.store.checkpoints.get(path_of_checkpoint_id(checkpoint_id), owner)
    return _json('{"source":{"kind":"s3"}}')  # "s3": its files come from the files route's signed URLs


@router.post("/checkpoints/validate")
def validate_checkpoint(body: schemas.ValidateCheckpointRequest, ctx: Context, owner: Owner) -> Response:
    path = from_bt(body.checkpoint_path)
    ctx.store.checkpoints.get(path, owner)
    if body.run_id is not None:
        run = ctx.store.runs.get(validate_run_id(body.run_id), owner)
        source = ctx.store.runs.get(path.run_id, owner, accessible=True)
        if source.base_model != run.base_model:
            raise InvalidRequestError(
                f"{body.checkpoint_path} was trained on {source.base_model!r}, not {run.base_model!r}"
            )
    return _json("{}")


@router.get("/capabilities")
def capabilities(ctx: Context, owner: Owner) -> Response:
    del owner  # any caller with a valid key may ask
    models = [
        schemas.SupportedModel(model_name=m.name, max_context_length=m.max_context_length) for m in ctx.models.values()
    ]
    return _json('{"supported_models":[' + ",".join(m.model_dump_json() for m in models) + "]}")
