"""What ``model`` names: a served base model, or a ``tinker://`` sampler or training checkpoint the caller may read
(their own, or a published one). Never a fallback: anything else is ``ModelNotFoundError`` (404, model_not_found).

Sampling goes through the same sampler rows as the Tinker API: each caller gets one session of their own for the
OpenAI front end (``openai-<digest of the owner>``), and each model they sample one sampler in it whose id is
derived from the model's name, so repeated requests reuse it (and the worker's cache of its weights).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

from tinkerd.api.context import ApiContext, ServedModelInfo
from tinkerd.api.openai.errors import ModelNotFoundError
from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ids import sampler_id
from tinkerd.domain.paths import parse_tinker_path
from tinkerd.domain.records import Sampler, Session, utc_now

SAMPLEABLE_KINDS = ("sampler_weights", "weights")


@dataclass(frozen=True)
class Target:
    """A resolved ``model``: the sampler to submit to and the base model it runs on."""

    name: str  # as the caller spelled it (echoed back as ``model``)
    sampler_id: str
    base: ServedModelInfo
    model_path: str | None  # the checkpoint, when not the base model


def _digest(text: str, hex_chars: int) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:hex_chars]


def session_id_for(owner: str) -> str:
    return f"openai-{_digest(owner, 24)}"


def resolve(ctx: ApiContext, owner: str, name: str) -> Target:
    """The model `name` as `owner` may sample it, its session and sampler rows created on first use."""
    model_path: str | None = None
    if name in ctx.models:
        base = ctx.models[name]
    elif name.startswith("tinker://"):
        try:
            path = parse_tinker_path(name)
            if path.kind not in SAMPLEABLE_KINDS:
                raise ModelNotFoundError(
                    f"{name} is a {path.kind} checkpoint; sample a sampler_weights or weights checkpoint"
                )
            checkpoint = ctx.store.checkpoints.get(path, owner)  # NotFoundError unless the caller may read it
            run = ctx.store.runs.get(checkpoint.run_id, owner, accessible=True)
        except (InvalidRequestError, NotFoundError) as error:
            if isinstance(error, ModelNotFoundError):
                raise
            raise ModelNotFoundError(f"The model {name!r} does not exist or you do not have access to it") from None
        base = ctx.models.get(run.base_model)  # type: ignore[assignment]
        if base is None:
            raise ModelNotFoundError(f"{name} was trained on {run.base_model!r}, which this server does not serve")
        model_path = checkpoint.tinker_path
    else:
        served = ", ".join(sorted(ctx.models)) or "none"
        raise ModelNotFoundError(
            f"The model {name!r} does not exist: name a served base model ({served}) or a tinker:// checkpoint"
        )
    if not base.sampleable:
        raise ModelNotFoundError(f"base model {base.name!r} is not served for sampling")
    session = _ensure_session(ctx, owner)
    # Base models and checkpoints never share a name, so the digest of the name picks one sampler per model.
    sampler = Sampler(
        id=sampler_id(session, int(_digest(name, 12), 16)),
        session_id=session,
        owner=owner,
        base_model=base.name,
        created_at=utc_now(),
        model_path=model_path,
    )
    ctx.store.samplers.create(sampler, exist_ok=True)
    return Target(name=name, sampler_id=sampler.id, base=base, model_path=model_path)


def _ensure_session(ctx: ApiContext, owner: str) -> str:
    session_id = session_id_for(owner)
    try:
        ctx.store.sessions.get(session_id, owner)
    except NotFoundError:
        now = utc_now()
        session = Session(
            id=session_id,
            owner=owner,
            created_at=now,
            last_heartbeat_at=now,
            display_name="OpenAI API",
            tags=("openai",),
        )
        with contextlib.suppress(ConflictError):  # created by a concurrent request of the same owner
            ctx.store.sessions.create(session)
    return session_id
