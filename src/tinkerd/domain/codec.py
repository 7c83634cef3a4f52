"""Requests and results <-> bytes for the ledger: JSON of the dataclasses, tagged with the class name.

Standard library only. Decoding is driven by the dataclasses' type hints, so adding a field needs no codec change;
fields missing from old rows take their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from tinkerd.domain import ops, requests
from tinkerd.domain.errors import InvalidRequestError

T = TypeVar("T")

_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for module in (ops, requests)
    for cls in vars(module).values()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__
}


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def encode(value: object) -> bytes:
    """``{"type": ClassName, "value": {...}}`` as UTF-8 JSON; NaN is rejected (it has no JSON spelling)."""
    name = type(value).__name__
    if _CLASSES.get(name) is not type(value):
        raise TypeError(f"{name} is not a request or result type")
    return json.dumps({"type": name, "value": _to_json(value)}, allow_nan=False, separators=(",", ":")).encode()


def decode(data: bytes) -> Any:
    envelope = json.loads(data)
    cls = _CLASSES[envelope["type"]]
    return _from_json(cls, envelope["value"])


def decode_as(data: bytes, expected: type[T]) -> T:
    value = decode(data)
    if not isinstance(value, expected):
        raise TypeError(f"expected {expected.__name__}, found {type(value).__name__}")
    return value


def _from_json(hint: Any, raw: Any) -> Any:
    origin = get_origin(hint)
    if hint is Any or hint is object:
        return raw
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = get_type_hints(hint, vars(_module_of(hint)))
        names = {f.name for f in dataclasses.fields(hint)}
        return hint(**{k: _from_json(hints[k], v) for k, v in raw.items() if k in names})
    if origin in (Union, types.UnionType):
        if raw is None:
            return None
        for arg in get_args(hint):
            if arg is type(None):
                continue
            try:
                return _from_json(arg, raw)
            except InvalidRequestError:  # a ValueError too, but a refusal of the value, not a mismatch of the type
                raise
            except (TypeError, KeyError, ValueError):
                continue
        return raw
    if origin is typing.Literal:
        return raw
    if origin is list:
        (arg,) = get_args(hint) or (Any,)
        return [_from_json(arg, v) for v in raw]
    if origin is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in raw)
        return tuple(_from_json(a, v) for a, v in zip(args, raw, strict=False)) if args else tuple(raw)
    if origin is dict:
        _, value_hint = get_args(hint) or (str, Any)
        return {k: _from_json(value_hint, v) for k, v in raw.items()}
    if hint is float and isinstance(raw, int):
        return float(raw)
    if isinstance(hint, type) and not isinstance(raw, hint):
        raise TypeError(f"{raw!r} is not {hint.__name__}")
    return raw


def _module_of(cls: type) -> types.ModuleType:
    import sys

    return sys.modules[cls.__module__]
