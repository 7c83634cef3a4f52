"""Domain results and records -> wire: JSON bodies, and protobuf for forward/backward and sampling results."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinkerd.api import rest_schemas, schemas
from tinkerd.api.context import ServedModelInfo
from tinkerd.api.proto import tinker_public_pb2 as pb
from tinkerd.domain import ops
from tinkerd.domain.records import Checkpoint, RequestKind, TrainingRun
from tinkerd.domain.requests import CreateModelResult, Empty, PathResult, Result, SamplerResult

# Empty top-k cells, as the SDK expects them (it trims these sentinels).
_TOPK_EMPTY_TOKEN = 0
_TOPK_EMPTY_LOGPROB = -99999.0

_PROTO_DTYPE = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}
_NUMPY_DTYPE = {"float32": np.dtype("<f4"), "int64": np.dtype("<i8")}
_STOP_REASON = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}
_CHECKPOINT_TYPE: dict[str, Any] = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}

# The `type` literal the SDK's response model accepts, per request kind (JSON results only).
_TYPE_TAG: dict[RequestKind, str] = {
    RequestKind.CREATE_MODEL: "create_model",
    RequestKind.SAVE_WEIGHTS: "save_weights",
    RequestKind.SAVE_WEIGHTS_FOR_SAMPLER: "save_weights_for_sampler",
    RequestKind.SAVE_WEIGHTS_EXTERNAL: "save_weights_external",
    RequestKind.LOAD_WEIGHTS: "load_weights",
    RequestKind.UNLOAD_MODEL: "unload_model",
}


# -- protobuf results --------------------------------------------------------------------------------------------------


def forward_result_proto(result: ops.ForwardResult) -> bytes:
    """All datums in one ArrayRecord: each output field is a BatchedTensor of every datum's values, concatenated."""
    message = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    record = message.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(result.loss_fn_outputs))
    names = list(result.loss_fn_outputs[0]) if result.loss_fn_outputs else []
    for name in names:
        arrays = [outputs[name] for outputs in result.loss_fn_outputs if name in outputs]
        if len(arrays) != len(result.loss_fn_outputs):
            continue  # a field only some datums have cannot be batched; the SDK never needs one
        dtype = arrays[0].dtype
        parts = [np.asarray(array.values, dtype=_NUMPY_DTYPE[dtype]).tobytes() for array in arrays]
        offsets = np.cumsum([0, *(len(part) for part in parts)], dtype=np.int64)
        field = record.fields[name]
        field.data = b"".join(parts)
        field.offsets = offsets.astype("<i8").tobytes()
        field.dtype = _PROTO_DTYPE[dtype]
        field.trailing_shape.extend(arrays[0].shape[1:])
    for key, value in result.metrics.items():
        message.metrics[key] = value
    return message.SerializeToString()


def _topk_proto(rows: list[list[tuple[int, float]] | None], target: pb.TopkLogprobs) -> None:
    k = max((len(row) for row in rows if row), default=0)
    if k == 0:
        return
    ids = np.full((len(rows), k), _TOPK_EMPTY_TOKEN, dtype="<i4")
    logprobs = np.full((len(rows), k), _TOPK_EMPTY_LOGPROB, dtype="<f4")
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or ()):
            ids[i, j] = token
            logprobs[i, j] = logprob
    target.token_ids = ids.tobytes()
    target.logprobs = logprobs.tobytes()
    target.k = k
    target.length = len(rows)


def sample_result_proto(result: ops.SampleResult) -> bytes:
    message = pb.SampleResponse()
    for sequence in result.sequences:
        out = message.sequences.add(stop_reason=_STOP_REASON[sequence.stop_reason])
        out.tokens = np.asarray(sequence.tokens, dtype="<i4").tobytes()
        if sequence.logprobs:
            out.logprobs = np.asarray(sequence.logprobs, dtype="<f4").tobytes()
    if result.prompt_logprobs is not None:
        values = [math.nan if value is None else value for value in result.prompt_logprobs]
        message.prompt_logprobs = np.asarray(values, dtype="<f4").tobytes()
    if result.topk_prompt_logprobs is not None:
        _topk_proto(result.topk_prompt_logprobs, message.topk_prompt_logprobs)
    return message.SerializeToString()


# -- JSON results ------------------------------------------------------------------------------------------------------


def _tensor_json(array: ops.ArrayData) -> dict[str, Any]:
    return {"data": list(array.values), "dtype": array.dtype, "shape": list(array.shape)}


def forward_result_json(result: ops.ForwardResult) -> dict[str, Any]:
    """The JSON shape SDKs before 0.25 read."""
    return {
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [
            {name: _tensor_json(a) for name, a in outputs.items()} for outputs in result.loss_fn_outputs
        ],
        "metrics": dict(result.metrics),
    }


def sample_result_json(result: ops.SampleResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "sample",
        "sequences": [
            {"stop_reason": s.stop_reason, "tokens": list(s.tokens), "logprobs": list(s.logprobs)}
            for s in result.sequences
        ],
    }
    if result.prompt_logprobs is not None:
        body["prompt_logprobs"] = list(result.prompt_logprobs)
    if result.topk_prompt_logprobs is not None:
        body["topk_prompt_logprobs"] = [
            None if row is None else [[token, logprob] for token, logprob in row] for row in result.topk_prompt_logprobs
        ]
    return body


def result_json(kind: RequestKind, result: Result, model_id: str | None = None) -> dict[str, Any]:
    """Any result as the JSON the SDK validates it with. Never has a top-level "error" key (that means failure).

    `model_id` is the future's model, which some answers repeat (UnloadModelResponse requires it)."""
    if isinstance(result, ops.ForwardResult):
        return forward_result_json(result)
    if isinstance(result, ops.SampleResult):
        return sample_result_json(result)
    if isinstance(result, ops.OptimStepResult):
        return {"metrics": dict(result.metrics)}
    body: dict[str, Any] = {}
    tag = _TYPE_TAG.get(kind)
    if tag is not None:
        body["type"] = tag
    if isinstance(result, CreateModelResult):
        body["model_id"] = result.model_id
    elif isinstance(result, PathResult):
        body["path"] = result.path
        if result.model_id is not None:
            body["model_id"] = result.model_id
        if result.size_bytes is not None and kind == RequestKind.SAVE_WEIGHTS_EXTERNAL:
            body["size_bytes"] = result.size_bytes
    elif isinstance(result, SamplerResult):
        body["sampling_session_id"] = result.sampling_session_id
    else:
        assert isinstance(result, Empty), type(result)
        if kind == RequestKind.UNLOAD_MODEL and model_id is not None:
            body["model_id"] = model_id
    return body


def result_proto(result: Result) -> bytes | None:
    """The protobuf encoding for the results that have one (forward/backward and sampling), else None."""
    if isinstance(result, ops.ForwardResult):
        return forward_result_proto(result)
    if isinstance(result, ops.SampleResult):
        return sample_result_proto(result)
    return None


# -- records -----------------------------------------------------------------------------------------------------------


def _string_map(value: dict[str, Any]) -> dict[str, str]:
    # The SDK declares metadata of runs and checkpoints as str -> str; our rows keep any JSON value.
    return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}


def checkpoint_to_wire(checkpoint: Checkpoint) -> rest_schemas.Checkpoint:
    return rest_schemas.Checkpoint(
        checkpoint_id=checkpoint.path.checkpoint_id,
        checkpoint_type=_CHECKPOINT_TYPE[checkpoint.kind],
        time=checkpoint.created_at,
        tinker_path=checkpoint.tinker_path,
        size_bytes=checkpoint.size_bytes,
        public=checkpoint.public,
        user_metadata=_string_map(checkpoint.user_metadata) if checkpoint.user_metadata else None,
        expires_at=checkpoint.expires_at,
    )


def training_run_to_wire(
    run: TrainingRun, last_checkpoint: Checkpoint | None, last_sampler_checkpoint: Checkpoint | None
) -> rest_schemas.TrainingRun:
    return rest_schemas.TrainingRun(
        training_run_id=run.id,
        base_model=run.base_model,
        model_owner=run.owner,
        is_lora=run.is_lora,
        corrupted=run.corrupted,
        lora_rank=run.lora.rank if run.is_lora else None,
        last_request_time=run.last_request_at,
        last_checkpoint=checkpoint_to_wire(last_checkpoint) if last_checkpoint else None,
        last_sampler_checkpoint=checkpoint_to_wire(last_sampler_checkpoint) if last_sampler_checkpoint else None,
        user_metadata=_string_map(run.user_metadata),
    )


def get_info(run: TrainingRun, model: ServedModelInfo | None) -> schemas.GetInfoResponse:
    return schemas.GetInfoResponse(
        model_id=run.id,
        model_data=schemas.ModelData(
            arch=model.arch if model else None,
            model_name=run.base_model,
            tokenizer_id=model.tokenizer_id if model else None,
        ),
        optimizer_config=dict(run.optimizer_config) or {"type": "adamw"},
        is_lora=run.is_lora,
        lora_rank=run.lora.rank if run.is_lora else None,
        model_name=run.base_model,
    )


def weights_info(run: TrainingRun) -> rest_schemas.WeightsInfoResponse:
    return rest_schemas.WeightsInfoResponse(
        base_model=run.base_model,
        is_lora=run.is_lora,
        lora_rank=run.lora.rank,
        train_unembed=run.lora.train_unembed,
        train_mlp=run.lora.train_mlp,
        train_attn=run.lora.train_attn,
        optimizer_config=dict(run.optimizer_config) or {"type": "adamw"},
    )


def supported_model(model: ServedModelInfo) -> rest_schemas.SupportedModel:
    return rest_schemas.SupportedModel(
        model_name=model.name,
        max_context_length=model.max_context_length,
        trainable=model.trainable,
        sampleable=model.sampleable,
    )
