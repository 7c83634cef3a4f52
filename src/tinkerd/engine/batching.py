"""Turning datums into packed rows: validation, tensor conversion, ordering, adapter routing."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ArrayData, Datum, ImageInput
from tinkerd.domain.provenance import check_provenance, sampled_positions
from tinkerd.engine.lora import LoraRouting, LoraWeights, Segment


def array_to_tensor(name: str, array: ArrayData, device: torch.device) -> torch.Tensor:
    """A loss input as a tensor; rejects shapes that do not match the values and non-finite numbers."""
    expected = math.prod(array.shape)
    if expected != len(array.values):
        raise InvalidRequestError(
            f"loss_fn_inputs[{name!r}]: shape {list(array.shape)} needs {expected} values, got {len(array.values)}"
        )
    dtype = torch.int64 if array.dtype == "int64" else torch.float32
    try:
        tensor = torch.tensor(array.values, dtype=dtype, device=device).reshape(array.shape)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}]: values are not {array.dtype} numbers ({exc})") from exc
    if dtype == torch.float32 and not bool(torch.isfinite(tensor).all()):
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] contains NaN or infinite values")
    return tensor


@dataclass
class Row:
    """One datum ready to run: its place in the caller's list and its tensors."""

    job: int
    index: int
    tokens: list[int]
    targets_T_K: torch.Tensor
    targets_2d: bool
    inputs: dict[str, torch.Tensor]
    adapter_key: str
    sampled_T: torch.Tensor | None = None  # bool: target positions a sampled provenance span covers; None without
    images: Sequence[ImageInput] = ()  # a vision-language model's images in the tokens (checked by the engine)


def prepare_row(
    job: int,
    index: int,
    datum: Datum,
    adapter_key: str,
    vocab_size: int,
    max_positions: int,
    device: torch.device,
) -> Row:
    """Validate one datum against the model and convert its loss inputs."""
    where = f"datum {index}"
    tokens = datum.tokens
    if not tokens:
        raise InvalidRequestError(f"{where}: model_input has no tokens")
    if len(tokens) > max_positions:
        raise InvalidRequestError(f"{where}: {len(tokens)} tokens exceed the model's context of {max_positions}")
    bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"{where}: token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    if "target_tokens" not in datum.loss_fn_inputs:
        raise InvalidRequestError(f"{where}: loss_fn_inputs needs 'target_tokens'")
    inputs = {name: array_to_tensor(name, arr, device) for name, arr in datum.loss_fn_inputs.items()}
    targets = inputs["target_tokens"].long()
    if targets.dim() not in (1, 2) or targets.shape[0] != len(tokens):
        raise InvalidRequestError(
            f"{where}: target_tokens has shape {list(targets.shape)}; expected [{len(tokens)}] or [{len(tokens)}, K]"
        )
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise InvalidRequestError(f"{where}: target_tokens contain ids outside the vocabulary [0, {vocab_size})")
    for name, tensor in inputs.items():
        if tensor.dim() == 0 or tensor.shape[0] != len(tokens):
            raise InvalidRequestError(
                f"{where}: loss_fn_inputs[{name!r}] has shape {list(tensor.shape)}; its first dimension must be "
                f"the number of tokens ({len(tokens)})"
            )
    targets_2d = targets.dim() == 2
    inputs["target_tokens"] = targets
    sampled_T = None
    if datum.loss_fn_input_spans is not None:
        check_provenance(datum, where)
        sampled_T = torch.tensor(sampled_positions(datum.loss_fn_input_spans), dtype=torch.bool, device=device)
    return Row(
        job=job,
        index=index,
        tokens=list(tokens),
        targets_T_K=targets if targets_2d else targets[:, None],
        targets_2d=targets_2d,
        inputs=inputs,
        adapter_key=adapter_key,
        sampled_T=sampled_T,
        images=datum.images,
    )


@dataclass(frozen=True)
class PackedRows:
    rows: list[Row]  # in packed order
    offsets: list[int]  # token offset of each row; offsets[-1] + len(last row) == total
    routing: LoraRouting
    targets_N_K: torch.Tensor


def pack_rows(rows: Sequence[Row], adapters: Mapping[str, LoraWeights | None], device: torch.device) -> PackedRows:
    """Order rows by adapter (contiguous LoRA segments) then by length (equal lengths share attention calls)."""
    ordered = sorted(rows, key=lambda r: (r.adapter_key, -len(r.tokens)))
    offsets: list[int] = []
    segments: list[Segment] = []
    total = 0
    width = max(r.targets_T_K.shape[1] for r in ordered)
    for row in ordered:
        offsets.append(total)
        end = total + len(row.tokens)
        weights = adapters[row.adapter_key]
        if segments and segments[-1].weights is weights:
            segments[-1] = Segment(segments[-1].start, end, weights)
        else:
            segments.append(Segment(total, end, weights))
        total = end
    # rows with fewer soft targets are padded with token 0; the padded columns are never read back
    targets = torch.zeros(total, width, dtype=torch.long, device=device)
    for row, off in zip(ordered, offsets, strict=True):
        targets[off : off + len(row.tokens), : row.targets_T_K.shape[1]] = row.targets_T_K
    return PackedRows(rows=ordered, offsets=offsets, routing=LoraRouting(tuple(segments)), targets_N_K=targets)


def units(rows: Sequence[Row], paired: Callable[[Row], bool]) -> list[list[Row]]:
    """Rows in the units that must run in one pass: a datum alone, or a (chosen, rejected) pair of a paired loss (the
    datums ``2i`` and ``2i + 1`` of one request), in first-seen order."""
    by_key: dict[tuple[int, int], list[Row]] = {}
    for row in rows:
        key = (row.job, row.index // 2) if paired(row) else (row.job, -1 - row.index)
        by_key.setdefault(key, []).append(row)
    return list(by_key.values())


def micro_batches(
    rows: Sequence[Row], max_tokens: int, paired: Callable[[Row], bool] = lambda _: False
) -> list[list[Row]]:
    """Split rows (kept whole, and pairs of a paired loss kept together) into groups of at most max_tokens tokens
    (a unit larger than that runs alone), longest first, to bound activation memory."""
    groups: list[list[Row]] = []
    current: list[Row] = []
    count = 0
    for unit in sorted(units(rows, paired), key=lambda u: -sum(len(r.tokens) for r in u)):
        size = sum(len(r.tokens) for r in unit)
        if current and count + size > max_tokens:
            groups.append(current)
            current, count = [], 0
        current.extend(unit)
        count += size
    if current:
        groups.append(current)
    return groups
