"""Loops wire requests -> domain requests, with the loss semantics the Loops SDK assumes; domain results -> Loops JSON.

Loss semantics (the Loops docs and SDK 0.32, facts only):

- ``cross_entropy`` may come with ``target_tokens`` holding -100 at masked positions and no ``weights``: the
  weights are then 1 where the target is real and 0 where it is -100 (a -100 with explicit weights is masked too).
- It is normalised per token unless ``loss_fn_config={"skip_token_normalization": true}``: the weights are divided
  by the number of positions with a nonzero weight in the whole request, so ``loss`` is the mean over tokens (what
  the SDK's chunk averaging assumes). Loops defers that division to ``optim_step`` across all the step's
  forward_backward calls; tinkerd divides per call, which is the same for the usual one call per step.
- With the flag, ``loss`` is ``sum(-logprobs * weights)`` and the answer's metrics say
  ``skip_token_normalization: 1.0`` (``forward_backward_custom`` requires it).
- ``dpo`` takes the same -100 targets (or weights), ``ref_logprobs`` aligned with them and (chosen, rejected) pairs
  at even and odd indices; its ``loss`` is the mean over the request's pairs (``engine.losses.preference``).
- Other losses take their inputs as the Tinker API does, unnormalised.
- ``top_k_logprobs=k`` adds ``top_k_logprobs`` (float32) and ``top_k_token_ids`` (int64), each ``[T, k]`` with the
  most likely first, to every datum's ``loss_fn_outputs``: the trainer's next-token distribution at each position.
- The answer's ``metrics`` carry the loss's own metrics (``dpo_accuracy:mean``, the sampler-drift means, ...) beside
  ``loss``.
"""

from __future__ import annotations

import math
from typing import Any

from tinkerd.api.context import ServedModelInfo
from tinkerd.api.convert.tensors import check_tokens
from tinkerd.api.images import ImageRules, ModelInputBuilder, decode_base64
from tinkerd.api.loops import schemas
from tinkerd.api.loops.common import to_bt
from tinkerd.domain import ops
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.paths import TinkerPath, validate_checkpoint_name
from tinkerd.domain.records import RequestKind
from tinkerd.domain.requests import AdapterState, ForwardBackward, OptimStep, PathResult, Result, SaveWeights

IGNORE_INDEX = -100  # the masked-target marker of PyTorch's cross-entropy, which Loops examples use
SKIP_NORMALIZATION = "skip_token_normalization"
# the losses whose targets may hold -100 where a position is masked (Loops' cross_entropy and dpo examples)
MASKED_TARGET_LOSSES = ("cross_entropy", "dpo")
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
MAX_TOP_K_LOGPROBS = 20  # the SDK's documented range is 0 through 20


def _array(where: str, tensor: schemas.TensorData) -> ops.ArrayData:
    if any(value is None for value in tensor.data):
        raise InvalidRequestError(f"{where} holds null values; every element must be a number")
    shape = tuple(tensor.shape) if tensor.shape is not None else (len(tensor.data),)
    if math.prod(shape) != len(tensor.data) or any(size < 0 for size in shape):
        raise InvalidRequestError(f"{where} has {len(tensor.data)} values but shape {list(shape)}")
    if tensor.dtype.startswith(("int", "uint")) or tensor.dtype == "bool":
        if not all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in tensor.data):
            raise InvalidRequestError(f"{where} has dtype {tensor.dtype} but holds non-integer values")
        return ops.ArrayData(values=[int(v) for v in tensor.data if v is not None], shape=shape, dtype="int64")
    if tensor.dtype.startswith(("float", "bfloat")):
        values = [float(v) for v in tensor.data if v is not None]
        if not all(math.isfinite(v) for v in values):
            raise InvalidRequestError(f"{where} holds a NaN or infinite value")
        return ops.ArrayData(values=values, shape=shape, dtype="float32")
    raise InvalidRequestError(f"{where} has dtype {tensor.dtype!r}; use an int or float dtype")


def model_input(where: str, model_input: schemas.ModelInput, rules: ImageRules | None) -> ModelInputBuilder:
    built = ModelInputBuilder(where, rules)
    for index, chunk in enumerate(model_input.chunks):
        if chunk.type == "encoded_text":
            built.text(chunk.tokens or (), index)
        elif chunk.type == "image":
            data = decode_base64(chunk.data or "", f"{where} chunk {index}")
            built.image(data, chunk.format, chunk.expected_tokens, index)
        else:
            raise InvalidRequestError(f"{where} chunk {index} is {chunk.type!r}; tinkerd takes text and image chunks")
    return built


def _masked_targets(inputs: dict[str, ops.ArrayData]) -> dict[str, ops.ArrayData]:
    """-100 targets become target 0 with weight 0; no weights means weight 1 on every real target."""
    targets = inputs.get("target_tokens")
    if targets is None or targets.dtype != "int64":
        return inputs
    target_values = [int(v) for v in targets.values]
    mask = [v != IGNORE_INDEX for v in target_values]
    weights = inputs.get("weights")
    if weights is None:
        weight_values = [1.0 if keep else 0.0 for keep in mask]
    elif weights.shape == targets.shape:
        weight_values = [float(w) if keep else 0.0 for w, keep in zip(weights.values, mask, strict=True)]
    else:
        return inputs  # a shape mismatch: the engine names it
    fixed = dict(inputs)
    fixed["target_tokens"] = ops.ArrayData(
        values=[v if keep else 0 for v, keep in zip(target_values, mask, strict=True)],
        shape=targets.shape,
        dtype="int64",
    )
    fixed["weights"] = ops.ArrayData(values=weight_values, shape=targets.shape, dtype="float32")
    return fixed


def _normalised(datums: list[ops.Datum]) -> list[ops.Datum]:
    """Weights divided by the request's count of weighted positions, so the loss is a per-token mean."""
    count = sum(1 for d in datums for w in d.loss_fn_inputs["weights"].values if w != 0)
    if count == 0:
        return datums
    out: list[ops.Datum] = []
    for datum in datums:
        weights = datum.loss_fn_inputs["weights"]
        scaled = ops.ArrayData(values=[float(w) / count for w in weights.values], shape=weights.shape)
        inputs = {**datum.loss_fn_inputs, "weights": scaled}
        out.append(ops.Datum(tokens=datum.tokens, loss_fn_inputs=inputs, images=datum.images))
    return out


def skips_normalization(config: dict[str, Any] | None) -> bool:
    return bool((config or {}).get(SKIP_NORMALIZATION, False))


def forward_backward(
    body: schemas.ForwardBackwardRequest,
    run_id: str,
    model: ServedModelInfo,
    *,
    backward: bool,
    rules: ImageRules | None = None,
) -> ForwardBackward:
    if not body.data:
        raise InvalidRequestError("data is empty: forward_backward needs at least one datum")
    if not 0 <= body.top_k_logprobs <= MAX_TOP_K_LOGPROBS:
        raise InvalidRequestError(
            f"top_k_logprobs must be between 0 and {MAX_TOP_K_LOGPROBS}, got {body.top_k_logprobs}"
        )
    config = dict(body.loss_fn_config or {})
    skip = skips_normalization(config)
    config.pop(SKIP_NORMALIZATION, None)
    numbers: dict[str, float] = {}
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        numbers[key] = float(value)
    datums: list[ops.Datum] = []
    for i, datum in enumerate(body.data):
        built = model_input(f"data[{i}].model_input", datum.model_input, rules)
        tokens = built.tokens
        check_tokens(tokens, f"data[{i}].model_input", model.vocab_size, model.max_context_length)
        inputs = {
            name: _array(f"data[{i}].loss_fn_inputs[{name!r}]", tensor) for name, tensor in datum.loss_fn_inputs.items()
        }
        if body.loss_fn in MASKED_TARGET_LOSSES:
            inputs = _masked_targets(inputs)
        datums.append(ops.Datum(tokens=tokens, loss_fn_inputs=inputs, images=built.images))
    if body.loss_fn == "cross_entropy" and not skip and all("weights" in d.loss_fn_inputs for d in datums):
        datums = _normalised(datums)
    return ForwardBackward(
        run_id=run_id,
        datums=datums,
        loss_fn=body.loss_fn,
        loss_fn_config=numbers,
        backward=backward,
        top_k_logprobs=body.top_k_logprobs,
    )


def optim_step(body: schemas.OptimStepRequest, run_id: str) -> OptimStep:
    params = body.adam_params
    for name, value in params.model_dump().items():
        if not math.isfinite(value):
            raise InvalidRequestError(f"adam_params.{name} must be a finite number, got {value}")
    if params.learning_rate < 0 or not (0 <= params.beta1 < 1 and 0 <= params.beta2 < 1):
        raise InvalidRequestError("adam_params: learning_rate must be >= 0 and the betas in [0, 1)")
    if params.eps <= 0 or params.weight_decay < 0 or params.grad_clip_norm < 0:
        raise InvalidRequestError("adam_params: eps must be > 0, weight_decay and grad_clip_norm >= 0")
    return OptimStep(run_id=run_id, adam=ops.AdamParams(**params.model_dump()))


def save(body: schemas.SaveRequest, run_id: str, *, for_sampler: bool) -> SaveWeights:
    if body.ttl_seconds is not None and not 1 <= body.ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidRequestError(f"ttl_seconds must be between 1 and {MAX_TTL_SECONDS}, got {body.ttl_seconds}")
    return SaveWeights(
        run_id=run_id,
        kind="sampler_weights" if for_sampler else "weights",
        name=validate_checkpoint_name(body.name),
        ttl_seconds=body.ttl_seconds,
        # Loops saves under a name again and again (e.g. "latest"); the newest wins.
        overwrite=True,
    )


# -- results -----------------------------------------------------------------------------------------------------------


def _tensor(array: ops.ArrayData) -> dict[str, Any]:
    return {"data": list(array.values), "dtype": array.dtype, "shape": list(array.shape)}


def forward_output(result: ops.ForwardResult, skip_normalization: bool) -> dict[str, Any]:
    loss = float(result.metrics.get("loss:sum", 0.0))
    metrics: dict[str, float] = {k: v for k, v in result.metrics.items() if k != "loss:sum"}
    metrics["loss"] = loss
    if skip_normalization:
        metrics[SKIP_NORMALIZATION] = 1.0
    return {
        "loss": loss,
        "loss_fn_output_type": "ArrayRecord",
        "loss_fn_outputs": [{name: _tensor(a) for name, a in outputs.items()} for outputs in result.loss_fn_outputs],
        "metrics": metrics,
    }


def op_result(kind: RequestKind, result: Result, skip_normalization: bool = False) -> dict[str, Any]:
    """The ``result`` of a finished trainer operation, in the shape of the SDK's response model for its kind."""
    match result:
        case ops.ForwardResult():
            return forward_output(result, skip_normalization)
        case ops.OptimStepResult():
            return {"metrics": dict(result.metrics)}
        case AdapterState():
            return {"step": result.step, "lora_rank": result.lora_rank}
        case PathResult() if kind is RequestKind.LOAD_WEIGHTS:
            return {"step": result.step or 0}
        case PathResult() if kind is RequestKind.SAVE_WEIGHTS_FOR_SAMPLER:
            # The policy version is the optimizer step count; 0 would tell the SDK "no LoRA yet, serve the base",
            # which is true of a fresh adapter (zero B matrices) too.
            return {"version": result.step or 0, "path": _bt(result.path)}
        case PathResult():
            return {"mode": "full", "path": _bt(result.path)}
        case _:
            return {}


def _bt(tinker_path: str) -> str:
    from tinkerd.domain.paths import parse_tinker_path

    return to_bt(parse_tinker_path(tinker_path))


def sample_completions(result: ops.SampleResult, prompt: list[int]) -> dict[str, Any]:
    """The vLLM completions JSON the SDK parses: token ids as ``token_id:N``, vLLM-style prompt logprobs."""
    prompt_logprobs: list[dict[str, dict[str, float]] | None] | None = None
    if result.prompt_logprobs is not None:
        prompt_logprobs = []
        for i, logprob in enumerate(result.prompt_logprobs):
            if logprob is None or i >= len(prompt):
                prompt_logprobs.append(None)
                continue
            entry = {str(prompt[i]): {"logprob": logprob}}
            rows = result.topk_prompt_logprobs
            if rows is not None and i < len(rows) and rows[i] is not None:
                for token, value in rows[i] or ():
                    entry.setdefault(str(token), {"logprob": value})
            prompt_logprobs.append(entry)
    choices: list[dict[str, Any]] = []
    for index, sequence in enumerate(result.sequences):
        choice: dict[str, Any] = {
            "index": index,
            "text": "",
            "finish_reason": sequence.stop_reason,
            "token_ids": list(sequence.tokens),
            "logprobs": {
                "tokens": [f"token_id:{t}" for t in sequence.tokens],
                "token_logprobs": list(sequence.logprobs),
            },
        }
        if prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs
            choice["prompt_token_ids"] = list(prompt)
        choices.append(choice)
    return {"object": "text_completion", "choices": choices}


def checkpoint_kind_target(path: TinkerPath) -> str:
    return "sampler" if path.kind == "sampler_weights" else "trainer"
