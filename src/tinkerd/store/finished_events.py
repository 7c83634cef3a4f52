"""The payload of a FINISHED event: the request id, and the finished record itself when it fits.

An api process waiting for a result in another process's hands learns of it by this event. When the record rides
along (small results: most forward, optim_step and save answers), the long-poll answers from it without reading the
ledger; a larger one (PostgreSQL refuses NOTIFY payloads of 8000 bytes or more) sends the id alone, and the poll
reads the ledger as before. The ledger stays the truth either way: the event is sent inside the transaction that
wrote the same record, and delivered only once it has committed.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, cast

from tinkerd.domain.records import ErrorCategory, FutureRecord, FutureState, RequestKind

# Under PostgreSQL's limit of 8000 bytes, with room for the channel name.
MAX_PAYLOAD_BYTES = 7800


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


def finished_payload(record: FutureRecord) -> str:
    """``request_id``, or ``request_id`` + newline + the finished record as JSON when that fits an event."""
    body: dict[str, Any] = {
        "owner": record.owner,
        "model_id": record.model_id,
        "seq_id": record.seq_id,
        "kind": record.kind.value,
        "ordered": record.ordered,
        "state": record.state.value,
        "result": record.result.decode() if record.result is not None else None,
        "error_message": record.error_message,
        "error_category": record.error_category,
        "token_count": record.token_count,
        "created_at": _time(record.created_at),
        "started_at": _time(record.started_at),
        "finished_at": _time(record.finished_at),
        "claimed_by": record.claimed_by,
    }
    text = f"{record.request_id}\n{json.dumps(body, separators=(',', ':'))}"  # ASCII: one byte per character
    return text if len(text) <= MAX_PAYLOAD_BYTES else record.request_id


def parse_finished(payload: str) -> tuple[str, FutureRecord | None]:
    """The request id of a FINISHED event, and its record if the event carried one (None for a bare id, or a body
    this version cannot read)."""
    request_id, newline, rest = payload.partition("\n")
    if not newline:
        return request_id, None
    try:
        body = json.loads(rest)
        created_at = _parse_time(body["created_at"])
        assert created_at is not None
        record = FutureRecord(
            request_id=request_id,
            owner=body["owner"],
            model_id=body["model_id"],
            seq_id=body["seq_id"],
            kind=RequestKind(body["kind"]),
            ordered=bool(body["ordered"]),
            state=FutureState(body["state"]),
            payload=None,
            result=body["result"].encode() if body["result"] is not None else None,
            error_message=body["error_message"],
            error_category=cast(ErrorCategory | None, body["error_category"]),
            token_count=int(body["token_count"]),
            created_at=created_at,
            started_at=_parse_time(body["started_at"]),
            finished_at=_parse_time(body["finished_at"]),
            claimed_by=body["claimed_by"],
        )
    except (ValueError, KeyError, TypeError, AssertionError):
        return request_id, None
    return request_id, record if record.state.finished else None
