"""retrieve_future: long-poll the ledger, then answer try_again, the error, or the result (JSON or protobuf).

The SDK re-polls a try_again at once, so the poll is held server-side (``ApiSettings.long_poll_s``, under the SDK's
45 s timeout). A result stays readable after delivery (the ledger keeps it until housekeeping purges it), so a
retried poll never meets "unknown request".
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import APIRouter, Request, Response
from starlette.background import BackgroundTask

from tinkerd.api import schemas
from tinkerd.api.context import ApiContext
from tinkerd.api.convert.results import result_json, result_proto
from tinkerd.api.routes.common import JSON, PROTOBUF, Context, Owner, in_thread, json_response
from tinkerd.domain import codec
from tinkerd.domain.records import FutureRecord, FutureState
from tinkerd.domain.requests import Result

router = APIRouter()


# Results up to this size (as stored) are rendered on the event loop; larger ones in a thread.
_INLINE_RENDER_BYTES = 64 * 1024


def _render(record: FutureRecord, value: Result | None, want_proto: bool) -> Response:
    """The finished future's answer; `value` is its result object when at hand (else decoded from the record)."""
    if record.state is FutureState.FAILED:
        # A 200 with an "error" key is how the SDK learns that a request failed (RequestFailedError + category).
        body = {"error": record.error_message or "request failed", "category": record.error_category or "server"}
        return Response(json.dumps(body), media_type=JSON)
    result: Result = value if value is not None else codec.decode(record.result or b"")
    proto = result_proto(result) if want_proto else None
    if proto is not None:
        return Response(proto, media_type=PROTOBUF)
    return Response(json.dumps(result_json(record.kind, result, record.model_id), allow_nan=False), media_type=JSON)


async def _answer(ctx: ApiContext, record: FutureRecord, value: Result | None, want_proto: bool) -> Response:
    if len(record.result or b"") <= _INLINE_RENDER_BYTES:
        response = _render(record, value, want_proto)
    else:
        response = await in_thread(_render, record, value, want_proto)
    # Noted once the answer is on the wire; it lets housekeeping purge the result later (see api/deliveries.py).
    response.background = BackgroundTask(_note_delivered, ctx, record.request_id)
    return response


async def _note_delivered(ctx: ApiContext, request_id: str) -> None:
    # async: Starlette would run a plain function in a thread, off the loop
    ctx.notifier.answered(request_id)  # the worker may go on (see FutureNotifier.await_answer)
    ctx.deliveries.note(request_id)


@router.post("/retrieve_future")
async def retrieve_future(
    body: schemas.FutureRetrieveRequest, request: Request, ctx: Context, owner: Owner
) -> Response:
    # 0.38 asks for protobuf for forward/backward and sampling results; SDKs before 0.20 accept only JSON.
    want_proto = PROTOBUF in request.headers.get("accept", "")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.settings.long_poll_s
    # Register before looking: a notification that lands between the look and the wait is not lost.
    # A request still running in this process needs no ledger read before the first wait (see FutureNotifier).
    look = not ctx.notifier.expected(body.request_id)
    with ctx.notifier.waiter(body.request_id) as woken:
        while True:
            woken.clear()
            handed = ctx.notifier.finished(body.request_id, owner)
            if handed is not None:
                return await _answer(ctx, handed.record, handed.value, want_proto)
            if look:
                record = await in_thread(ctx.store.futures.get, body.request_id, owner)
                if record.state.finished:
                    return await _answer(ctx, record, None, want_proto)
            look = True
            remaining = deadline - loop.time()
            if remaining <= 0 or ctx.notifier.closed:
                return json_response(schemas.TryAgainResponse(request_id=body.request_id))
            # A timeout only means: read the ledger again. (asyncio.timeout, unlike wait_for, starts no extra task.)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, ctx.settings.poll_interval_s)):
                    await woken.wait()
