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
from typing import Any

from tinkerd.domain.records import FutureRecord
from tinkerd.store.codec import future_from_row, future_to_row

# Under PostgreSQL's limit of 8000 bytes, with room for the channel name.
MAX_PAYLOAD_BYTES = 7800
# Ledger columns that are bytes or times, carried in JSON as text
_BYTES = ("payload", "result")
_TIMES = ("created_at", "started_at", "finished_at", "delivered_at")


def finished_payload(record: FutureRecord) -> str:
    """``request_id``, or ``request_id`` + newline + the finished record's ledger row as JSON when that fits."""
    row = future_to_row(record)
    for name in _BYTES:
        row[name] = row[name].decode() if row[name] is not None else None
    for name in _TIMES:
        row[name] = row[name].isoformat() if row[name] is not None else None
    text = f"{record.request_id}\n{json.dumps(row, separators=(',', ':'))}"  # ASCII: one byte per character
    return text if len(text) <= MAX_PAYLOAD_BYTES else record.request_id


def parse_finished(payload: str) -> tuple[str, FutureRecord | None]:
    """The request id of a FINISHED event, and its record if the event carried one (None for a bare id, or a body
    this version cannot read)."""
    request_id, newline, rest = payload.partition("\n")
    if not newline:
        return request_id, None
    try:
        row: dict[str, Any] = json.loads(rest)
        for name in _BYTES:
            row[name] = row[name].encode() if row[name] is not None else None
        for name in _TIMES:
            row[name] = datetime.fromisoformat(row[name]) if row[name] is not None else None
        record = future_from_row(row)
    except (ValueError, KeyError, TypeError, AttributeError):
        return request_id, None
    return request_id, record if record.request_id == request_id and record.state.finished else None
