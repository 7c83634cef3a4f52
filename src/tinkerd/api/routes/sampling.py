"""Sampling: create_sampling_session, samplers/{id}, asample."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tinkerd.api import schemas
from tinkerd.api.convert import sampling as convert
from tinkerd.api.routes.common import Context, Owner, future_response, image_rules, json_response, submit
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ids import validate_sampler_id
from tinkerd.domain.paths import parse_tinker_path
from tinkerd.domain.records import RequestKind, utc_now

router = APIRouter()


@router.post("/create_sampling_session")
def create_sampling_session(body: schemas.CreateSamplingSessionRequest, ctx: Context, owner: Owner) -> Response:
    """A sampler of a base model, or of a checkpoint's adapter (``model_path``, whose run fixes the base model)."""
    if body.model_path:
        path = parse_tinker_path(body.model_path)
        checkpoint = ctx.store.checkpoints.get(path, owner)  # 404 unless the caller may read it
        base_model = ctx.store.runs.get(checkpoint.run_id, owner, accessible=True).base_model
        if body.base_model and body.base_model != base_model:
            raise InvalidRequestError(f"{path} was trained on {base_model!r}, not on {body.base_model!r}")
    elif body.base_model:
        base_model = body.base_model
    else:
        raise InvalidRequestError("create_sampling_session needs a model_path or a base_model")
    if not ctx.model(base_model).sampleable:
        raise InvalidRequestError(f"base model {base_model!r} is not served for sampling")
    sampler = ctx.store.samplers.create(convert.new_sampler(body, base_model, owner, utc_now()), exist_ok=True)
    return json_response(schemas.CreateSamplingSessionResponse(sampling_session_id=sampler.id))


@router.get("/samplers/{sampler_id}")
def get_sampler(sampler_id: str, ctx: Context, owner: Owner) -> Response:
    sampler = ctx.store.samplers.get(validate_sampler_id(sampler_id), owner)
    return json_response(
        schemas.GetSamplerResponse(sampler_id=sampler.id, base_model=sampler.base_model, model_path=sampler.model_path)
    )


@router.post("/asample")
def asample(body: schemas.SampleRequest, http: Request, ctx: Context, owner: Owner) -> Response:
    if not body.sampling_session_id:
        raise InvalidRequestError(
            "sampling_session_id is required: create a sampling client first (create_sampling_session)"
        )
    sampler = ctx.store.samplers.get(validate_sampler_id(body.sampling_session_id), owner)
    header = http.headers.get(convert.LOGPROBS_HEADER)
    reported = convert.logprobs_of(header) if header is not None else ctx.settings.sample_logprobs
    model = ctx.model(sampler.base_model)
    request = convert.sample(body, sampler, model, reported, image_rules(ctx, model))
    record = submit(
        ctx,
        owner,
        model_id=sampler.id,
        seq_id=body.seq_id,
        kind=RequestKind.SAMPLE,
        payload=request,
        token_count=convert.sample_token_count(request),
    )
    # Derived from the request id, so a retried submit (same sampler and seq_id, same record) gets the same ids.
    sequence_ids = [f"{record.request_id}:{i}" for i in range(request.num_samples)]
    return future_response(schemas.UntypedAPIFuture(request_id=record.request_id, sample_sequence_ids=sequence_ids))
