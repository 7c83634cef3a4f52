"""Tensors and token lists on the wire (JSON TensorData, protobuf Tensor, packed int32 tokens) -> domain arrays.

Every check here names the offending input, because the message goes straight back to the user as a 400.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from tinkerd.api import schemas
from tinkerd.api.proto import tinker_public_pb2 as pb
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ArrayData, CellGrid, DType

_PROTO_DTYPES: dict[int, tuple[DType, np.dtype]] = {
    pb.DTYPE_FLOAT32: ("float32", np.dtype("<f4")),
    pb.DTYPE_INT64: ("int64", np.dtype("<i8")),
    pb.DTYPE_INT32: ("int64", np.dtype("<i4")),
}
_NUMPY_DTYPES: dict[DType, np.dtype] = {"float32": np.dtype(np.float32), "int64": np.dtype(np.int64)}


def _array_data(name: str, flat: npt.NDArray[np.generic], shape: tuple[int, ...], dtype: DType) -> ArrayData:
    if dtype == "float32":
        if not np.isfinite(flat).all():
            raise InvalidRequestError(f"loss_fn_inputs[{name!r}] contains NaN or infinite values")
        values: list[int] | list[float] = flat.astype(np.float64).tolist()
    else:
        values = flat.astype(np.int64).tolist()
    return ArrayData(values=values, shape=shape, dtype=dtype)


def _shape(name: str, shape: list[int] | None, count: int) -> tuple[int, ...]:
    if not shape:
        return (count,)
    if any(dim < 0 for dim in shape):
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] has a negative dimension in shape {shape}")
    if math.prod(shape) != count:
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] has {count} values but shape {shape}")
    return tuple(shape)


def _densify(
    name: str,
    values: npt.NDArray[np.generic],
    crow: npt.NDArray[np.int64],
    col: npt.NDArray[np.int64],
    shape: list[int] | None,
) -> npt.NDArray[np.generic]:
    """A CSR matrix as a dense flat array; unlisted cells are 0 (the pad value the SDK uses for training inputs)."""
    if shape is None or len(shape) != 2:
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] is sparse, so it needs a 2-D shape, got {shape}")
    rows, cols = shape
    if len(crow) != rows + 1 or len(col) != len(values) or (len(crow) and (crow[0] != 0 or crow[-1] != len(values))):
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] has inconsistent sparse CSR indices")
    if np.any(np.diff(crow) < 0) or (len(col) and (col.min() < 0 or col.max() >= cols)):
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] has sparse indices outside its shape {shape}")
    dense = np.zeros((rows, cols), dtype=values.dtype)
    row_of = np.repeat(np.arange(rows), np.diff(crow))
    dense[row_of, col] = values
    return dense.reshape(-1)


def array_from_json(name: str, tensor: schemas.TensorData) -> ArrayData:
    dtype = _NUMPY_DTYPES[tensor.dtype]
    try:
        with np.errstate(over="raise"):  # 1e308 as float32 would quietly become infinity
            flat = np.asarray(tensor.data, dtype=dtype)
    except (OverflowError, ValueError, FloatingPointError):
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] has values that do not fit {tensor.dtype}") from None
    if tensor.sparse_crow_indices is not None or tensor.sparse_col_indices is not None:
        try:
            crow = np.asarray(tensor.sparse_crow_indices or [], dtype=np.int64)
            col = np.asarray(tensor.sparse_col_indices or [], dtype=np.int64)
        except (OverflowError, ValueError):
            raise InvalidRequestError(f"loss_fn_inputs[{name!r}] has sparse indices that do not fit int64") from None
        flat = _densify(name, flat, crow, col, tensor.shape)
    return _array_data(name, flat, _shape(name, tensor.shape, flat.size), tensor.dtype)


def _frombuffer(name: str, data: bytes, dtype: np.dtype) -> npt.NDArray[np.generic]:
    if len(data) % dtype.itemsize:
        raise InvalidRequestError(f"{name}: {len(data)} bytes is not a whole number of {dtype.name} values")
    return np.frombuffer(data, dtype=dtype)


def array_from_proto(name: str, tensor: pb.Tensor) -> ArrayData:
    known = _PROTO_DTYPES.get(tensor.dtype)
    if known is None:
        raise InvalidRequestError(f"loss_fn_inputs[{name!r}] has unsupported dtype {tensor.dtype}")
    dtype, np_dtype = known
    shape = list(tensor.shape) or None
    label = f"loss_fn_inputs[{name!r}]"
    if tensor.WhichOneof("encoding") == "sparse_csr":
        csr = tensor.sparse_csr
        values = _frombuffer(label, csr.values, np_dtype)
        crow = _frombuffer(label, csr.crow_indices, np.dtype("<i8")).astype(np.int64)
        col = _frombuffer(label, csr.col_indices, np.dtype("<i8")).astype(np.int64)
        flat = _densify(name, values, crow, col, shape)
    else:
        flat = _frombuffer(label, tensor.dense, np_dtype)
    return _array_data(name, flat, _shape(name, shape, flat.size), dtype)


def tokens_from_proto(data: bytes) -> list[int]:
    return _frombuffer("encoded_text tokens", data, np.dtype("<i4")).tolist()


def check_tokens(tokens: list[int], where: str, vocab_size: int, max_length: int) -> None:
    """Early, cheap checks with a clear message (the engine checks again): ids in the vocabulary, length in context."""
    if not tokens:
        raise InvalidRequestError(f"{where} has no tokens")
    if len(tokens) > max_length:
        raise InvalidRequestError(f"{where} has {len(tokens)} tokens, more than the model's context of {max_length}")
    low, high = min(tokens), max(tokens)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise InvalidRequestError(f"{where} contains token id {bad}, outside the vocabulary [0, {vocab_size})")


def target_cells(tensor: schemas.TensorData) -> CellGrid:
    """``target_prompt_logprobs``: a 2-D int64 tensor of token ids, dense or sparse CSR, ``-1`` = no request; the
    cells that name an id (and, when sparse, every listed cell), in the request's order (the answer comes back in
    the same layout)."""
    name = "target_prompt_logprobs"
    if tensor.dtype != "int64":
        raise InvalidRequestError(f"{name} must be an int64 tensor of token ids, got {tensor.dtype}")
    shape = tensor.shape
    if shape is None or len(shape) != 2 or min(shape) < 0:
        raise InvalidRequestError(f"{name} must be 2-D, [len(prompt) - 1, K], got shape {shape}")
    rows, cols = shape
    sparse = tensor.sparse_crow_indices is not None or tensor.sparse_col_indices is not None
    try:
        values = np.asarray(tensor.data, dtype=np.int64)
        crow = np.asarray(tensor.sparse_crow_indices or [], dtype=np.int64)
        col = np.asarray(tensor.sparse_col_indices or [], dtype=np.int64)
    except (OverflowError, ValueError):
        raise InvalidRequestError(f"{name} has values that do not fit int64") from None
    if sparse:
        if len(crow) != rows + 1 or len(col) != len(values) or crow[0] != 0 or crow[-1] != len(values):
            raise InvalidRequestError(f"{name} has inconsistent sparse CSR indices for shape {shape}")
        if np.any(np.diff(crow) < 0) or (len(col) and (col.min() < 0 or col.max() >= cols)):
            raise InvalidRequestError(f"{name} has sparse indices outside its shape {shape}")
        row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(crow))
        col_of = col
    else:
        if values.size != rows * cols:
            raise InvalidRequestError(f"{name} has {values.size} values but shape {shape}")
        row_of, col_of = np.divmod(np.arange(values.size, dtype=np.int64), max(cols, 1))
    named = np.ones(values.size, dtype=bool) if sparse else values != -1  # a listed -1 cell keeps its place
    return CellGrid(
        shape=(rows, cols),
        rows=row_of[named].tolist(),
        cols=col_of[named].tolist(),
        values=values[named].tolist(),
        sparse=sparse,
    )
