"""Loops operations: a submit answers 202 ``{"operation_id"}``; ``GET .../operations/{id}`` holds the poll until the
request finishes (200 ``{"status": "done", "result"}`` or ``{"status": "error", "error", "error_class"}``) or the
hold runs out (408, which the SDK re-polls at once, so the hold is what keeps it from spinning).

The operation id is the ledger's request id, so a poll after a restart or a retried submit (same run, same
seq_id: the same request) finds the same request. A forward whose loss was left unnormalised carries that in its
id (``<request_id>.sum``), because its answer must say so and the request's payload may be gone by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from fastapi import Response
from starlette.background import BackgroundTask

from tinkerd.api.context import ApiContext
from tinkerd.api.loops import convert
from tinkerd.api.routes.common import JSON, in_thread
from tinkerd.domain import codec
from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.records import FutureRecord, FutureState
from tinkerd.domain.requests import Result

SUM_SUFFIX = ".sum"
# Under the SDK's 35 s read timeout for polls.
MAX_HOLD_S = 25.0


def accepted(request_id: str, *, skip_normalization: bool = False) -> Response:
    operation_id = request_id + (SUM_SUFFIX if skip_normalization else "")
    body = json.dumps({"operation_id": operation_id, "schema_version": 1})
    return Response(body, status_code=202, media_type=JSON, headers={"location": f"/operations/{operation_id}"})


def _split(operation_id: str) -> tuple[str, bool]:
    if operation_id.endswith(SUM_SUFFIX):
        return operation_id[: -len(SUM_SUFFIX)], True
    return operation_id, False


def _error_class(record: FutureRecord) -> str:
    return "ValueError" if record.error_category == "user" else "RuntimeError"


def _body(record: FutureRecord, value: Result | None, skip: bool, render: Any) -> dict[str, Any]:
    if record.state is FutureState.FAILED:
        message = record.error_message or "request failed"
        return {"status": "error", "error": message, "error_class": _error_class(record)}
    result: Result = value if value is not None else codec.decode(record.result or b"")
    return {"status": "done", "result": render(record, result, skip)}


def trainer_result(record: FutureRecord, result: Result, skip: bool) -> dict[str, Any]:
    return convert.op_result(record.kind, result, skip)


async def _answer(ctx: ApiContext, record: FutureRecord, value: Result | None, skip: bool, render: Any) -> Response:
    body = await in_thread(_body, record, value, skip, render)
    response = Response(json.dumps(body, allow_nan=False), media_type=JSON)
    response.background = BackgroundTask(_note_delivered, ctx, record.request_id)
    return response


async def _note_delivered(ctx: ApiContext, request_id: str) -> None:
    ctx.notifier.answered(request_id)
    ctx.deliveries.note(request_id)


async def poll(ctx: ApiContext, owner: str, operation_id: str, model_id: str, render: Any) -> Response:
    """Hold until the request is finished, then answer it; 408 when the hold runs out. ``model_id`` is the run or
    sampler the URL names: an operation of another one is unknown here (404)."""
    request_id, skip = _split(operation_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(ctx.settings.long_poll_s, MAX_HOLD_S)
    look = not ctx.notifier.expected(request_id)
    with ctx.notifier.waiter(request_id) as woken:
        while True:
            woken.clear()
            handed = ctx.notifier.finished(request_id, owner)
            if handed is not None:
                _check_scope(handed.record, operation_id, model_id)
                return await _answer(ctx, handed.record, handed.value, skip, render)
            if look:
                record = await in_thread(ctx.store.futures.get, request_id, owner)
                _check_scope(record, operation_id, model_id)
                if record.state.finished:
                    return await _answer(ctx, record, None, skip, render)
            look = True
            remaining = deadline - loop.time()
            if remaining <= 0 or ctx.notifier.closed:
                return Response(
                    json.dumps({"status": "pending", "operation_id": operation_id}), status_code=408, media_type=JSON
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, ctx.settings.poll_interval_s)):
                    await woken.wait()


async def result_now(ctx: ApiContext, owner: str, operation_id: str, model_id: str, render: Any) -> Response:
    """The finished operation's result itself, in a 200 (held for as long as it runs); its failure raised, a user's
    mistake as InvalidRequestError (a final 4xx) and anything else as a server error."""
    response = await poll(ctx, owner, operation_id, model_id, render)
    while response.status_code == 408 and not ctx.notifier.closed:
        response = await poll(ctx, owner, operation_id, model_id, render)
    body = json.loads(bytes(response.body))
    if body.get("status") == "error":
        if body.get("error_class") == "ValueError":
            raise InvalidRequestError(body["error"])
        raise RuntimeError(body["error"])
    if body.get("status") != "done":  # the server is shutting down: 503, which the SDK retries elsewhere
        message = f"operation {operation_id!r} did not finish: the server is shutting down"
        return Response(json.dumps({"error": message, "detail": message}), status_code=503, media_type=JSON)
    answer = Response(json.dumps(body["result"], allow_nan=False), media_type=JSON)
    answer.background = response.background
    return answer


def _check_scope(record: FutureRecord, operation_id: str, model_id: str) -> None:
    if not (record.model_id == model_id or record.model_id.startswith(model_id + ":")):
        raise NotFoundError(f"no operation {operation_id!r} here")
