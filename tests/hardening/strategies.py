"""Hypothesis strategies for hostile requests: values from the served OpenAPI document's JSON schemas, mutated.

``body_for(schema, ...)`` mostly draws schema-shaped bodies whose id-like fields come from a pool of real ids (the
caller's own, another user's, malformed and path-traversing ones), so requests get past "unknown id" and reach the
deeper checks; the rest of the time it breaks them: a required field dropped, a field of the wrong type, a body
of another JSON type, or bytes that are not JSON at all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hypothesis import strategies as st

JsonSchema = Mapping[str, Any]

# Integers that find edge cases: signs, int32/int64 boundaries, beyond int64 (JSON has no bound), context sizes.
EDGE_INTS = [-(2**63) - 1, -(2**63), -(2**31), -1, 0, 1, 2, 255, 256, 257, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**30]
EDGE_FLOATS = [0.0, -0.0, 1e-320, -1.0, 1e308, -1e308, math.nan, math.inf, -math.inf, 0.5, 2.0]
HOSTILE_STRINGS = [
    "", " ", ".", "..", "../..", "../../etc/passwd", "/etc/passwd", "a/../../b", "%2e%2e%2f", "..%2f..%2f",
    "tinker://", "tinker://../weights/x", "tinker://a/weights/../../x", "tinker://r/weights/x/y",
    "tinker://r/other/x", "tinker://r/weights/.hidden", "tinker://r:train:0/weights/-rf", "\x00", "a\x00b",
    "\n", "\u202e", "é", "x" * 300, "-rf", "~", "$(id)", "'; DROP TABLE futures; --", "null", "0",
]  # fmt: skip

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
edge_ints = st.sampled_from(EDGE_INTS) | st.integers(-5, 300)
edge_floats = st.sampled_from(EDGE_FLOATS) | st.floats(-10, 10)
hostile_text = st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=40)


def mostly(valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` five times in six, else ``invalid``: one bad field at a time gets past the others' checks."""
    return st.integers(0, 5).flatmap(lambda n: invalid if n == 5 else valid)


class Resolver:
    """Follows ``$ref`` inside one OpenAPI document."""

    def __init__(self, document: JsonSchema) -> None:
        self.document = document

    def __call__(self, schema: JsonSchema) -> JsonSchema:
        while "$ref" in schema:
            node: Any = self.document
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema


def schema_values(
    schema: JsonSchema, resolve: Resolver, pools: Mapping[str, Sequence[str]], field: str = "", depth: int = 0
) -> st.SearchStrategy[Any]:
    """Values that fit ``schema`` (mostly); ``pools`` maps field names to real values worth trying."""
    schema = resolve(schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | hostile_text
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf") or []
        return st.one_of([schema_values(option, resolve, pools, field, depth) for option in options])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        if depth > 4:
            return st.just({})
        properties: Mapping[str, JsonSchema] = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fields = {name: schema_values(s, resolve, pools, name, depth + 1) for name, s in properties.items()}
        extra = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
        return st.builds(
            lambda fixed, more: {**more, **fixed},
            st.fixed_dictionaries(
                {k: v for k, v in fields.items() if k in required},
                optional={k: v for k, v in fields.items() if k not in required},
            ),
            extra if schema.get("additionalProperties") else st.just({}),
        )
    if kind == "array":
        items = schema.get("items", {})
        return st.lists(schema_values(items, resolve, pools, field, depth + 1), max_size=6)
    if kind == "string":
        pool = pools.get(field)
        return (st.sampled_from(list(pool)) | hostile_text) if pool else hostile_text
    if kind == "integer":
        return edge_ints
    if kind == "number":
        return edge_floats | edge_ints
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> Any:
    """A drawn body, left alone half of the time, otherwise broken in one way."""
    body = draw(valid)
    how = draw(st.sampled_from(["keep", "keep", "keep", "drop", "retype", "other_json"]))
    if how == "other_json" or not isinstance(body, dict):
        return draw(json_values) if how == "other_json" else body
    if how == "keep" or not body:
        return body
    key = draw(st.sampled_from(sorted(body)))
    if how == "drop":
        return {k: v for k, v in body.items() if k != key}
    return {**body, key: draw(json_values.filter(lambda v: type(v) is not type(body[key])))}


def encode(body: Any) -> bytes:
    # allow_nan: NaN and Infinity literals are invalid JSON that some parsers accept; the server must refuse them.
    return json.dumps(body, allow_nan=True).encode()


garbage_bodies = st.sampled_from(
    [b"", b"{", b"[", b"nul", b'{"a": }', b"\xff\xfe\x00", b'{"x": NaN}', b"1e999999", b"[" * 5000 + b"]" * 5000]
) | st.binary(max_size=64)
