"""Schema-driven fuzzing of every JSON endpoint in the served OpenAPI document, against a live tinkerd.

For each operation, hypothesis draws path parameters, query parameters and a body from the operation's schemas
(id-like fields from a pool of real ids: the caller's, another user's, near misses, path traversals), then breaks
some of them (dropped or retyped fields, other JSON, bytes that are not JSON). Every answer must be a 2xx or a
4xx with a message, never a 5xx; the module's teardown (conftest.live) also requires that no accepted request
failed with an internal error, that nothing was logged at ERROR level, and that the server still works.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.checks import check_answer
from tests.hardening.conftest import tally
from tests.hardening.fixtures import World
from tests.hardening.live import SERVED, Live
from tests.hardening.strategies import Resolver, encode, garbage_bodies, hostile_text, mutated, schema_values
from tinkerd.api import create_app
from tinkerd.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.fuzz]

# Raw-body routes (no schema in the document) have their own fuzz module: test_fuzz_training.
_RAW_BODY = {"/api/v1/forward_backward", "/api/v1/forward"}
EXAMPLES = int(os.environ.get("TINKERD_FUZZ_EXAMPLES", "80"))
# CI replays the same cases every run (a landing must not depend on luck); TINKERD_FUZZ_RANDOM=1 explores new ones.
RANDOM = os.environ.get("TINKERD_FUZZ_RANDOM") == "1"


def _document() -> dict[str, Any]:
    store = Store.open("sqlite://")  # the document only: nothing is stored
    try:
        return create_app(store, [SERVED]).openapi()
    finally:
        store.close()


DOCUMENT = _document()
OPERATIONS = [
    (method.upper(), path)
    for path, operations in DOCUMENT["paths"].items()
    for method in operations
    if path not in _RAW_BODY
]


def _requests(method: str, path: str, pools: dict[str, list[str]]) -> st.SearchStrategy[dict[str, Any]]:
    operation = DOCUMENT["paths"][path][method.lower()]
    resolve = Resolver(DOCUMENT)
    path_params: dict[str, st.SearchStrategy[str]] = {}
    query: dict[str, st.SearchStrategy[Any]] = {}
    for parameter in operation.get("parameters", []):
        values = schema_values(parameter.get("schema", {}), resolve, pools, parameter["name"])
        if parameter["in"] == "path":
            pool = pools.get(parameter["name"], [])
            path_params[parameter["name"]] = (st.sampled_from(pool) if pool else hostile_text) | hostile_text
        else:
            query[parameter["name"]] = values | hostile_text
    schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is not None:
        body = st.one_of(mutated(schema_values(schema, resolve, pools)).map(encode), garbage_bodies)
    else:
        body = st.just(b"") | garbage_bodies
    return st.fixed_dictionaries(
        {
            "path": st.fixed_dictionaries(path_params),
            "query": st.fixed_dictionaries({}, optional=query),
            "body": body,
            "raw_path": st.integers(0, 9).map(lambda n: n == 0),  # now and then, path segments unescaped
        }
    )


@pytest.mark.parametrize(
    ("method", "path"), OPERATIONS, ids=[f"{m} {p.removeprefix('/api/v1')}" for m, p in OPERATIONS]
)
def test_operation_never_answers_5xx(live: Live, world: World, method: str, path: str) -> None:
    pools = world.pools()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(_requests(method, path, pools))
    def case(request: dict[str, Any]) -> None:
        url = path
        for name, value in request["path"].items():
            raw = request["raw_path"] and value.isascii() and value.isprintable()  # the client refuses the rest
            url = url.replace("{" + name + "}", value if raw else quote(value, safe=""))
        response = live.client.request(
            method,
            url,
            params={k: str(v) for k, v in request["query"].items()},
            content=request["body"] if method != "GET" else None,
            headers={"content-type": "application/json"},
        )
        tally(f"{method} {path.removeprefix('/api/v1')}", response.status_code)
        check_answer(response, f"{method} {url} {request['body'][:300]!r}")

    case()
