"""The futures table's statements and row helpers, shared by the ledger (store.futures), its upkeep
(store.upkeep) and admission (store.admission).

The statements every request runs are built once: building one costs more than SQLite takes to run it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

from sqlalchemy import Connection, RowMapping, bindparam, insert, select, update

from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.ids import new_request_id
from tinkerd.domain.records import FutureRecord, FutureState, RequestKind
from tinkerd.store.codec import future_from_row
from tinkerd.store.tables import futures

CHUNK = 500  # ids per IN (...) list: far below every backend's bound-parameter limit
WITHOUT_PAYLOAD = [c for c in futures.c if c.name != "payload"]

INSERT = insert(futures)
BY_ID = select(*WITHOUT_PAYLOAD).where(futures.c.request_id == bindparam("request_id"))
BY_ID_AND_OWNER = BY_ID.where(futures.c.owner == bindparam("owner"))
FULL_BY_ID_AND_OWNER = select(*futures.c).where(
    futures.c.request_id == bindparam("request_id"), futures.c.owner == bindparam("owner")
)
BY_MODEL_SEQ = select(*WITHOUT_PAYLOAD).where(
    futures.c.model_id == bindparam("model_id"), futures.c.seq_id == bindparam("seq_id")
)
FULL_BY_IDS = select(*futures.c).where(futures.c.request_id.in_(bindparam("ids", expanding=True)))
CLAIM = (
    update(futures)
    .where(futures.c.request_id.in_(bindparam("ids", expanding=True)), futures.c.state == FutureState.PENDING.value)
    .values(state=FutureState.RUNNING.value, started_at=bindparam("now"), claimed_by=bindparam("worker_id"))
)
FINISH = (
    update(futures)
    .where(futures.c.request_id == bindparam("b_request_id"))
    .values(
        state=bindparam("b_state"),
        finished_at=bindparam("b_finished_at"),
        # The payload (a whole training batch, possibly megabytes) is dropped once it has run: keeping it would
        # grow the ledger by the size of all training data, and a repeat submit only needs the key.
        payload=None,
        result=bindparam("b_result"),
        error_message=bindparam("b_error_message"),
        error_category=bindparam("b_error_category"),
    )
)


def failed_placeholder(
    *, owner: str, model_id: str, seq_id: int, kind: RequestKind, message: str, now: datetime
) -> FutureRecord:
    """A request recorded as failed from the start: it holds an ordered seq_id that will never run (a refused
    request, or one that never arrived), so the model's later requests are not held up by a gap."""
    return FutureRecord(
        request_id=new_request_id(),
        owner=owner,
        model_id=model_id,
        seq_id=seq_id,
        kind=kind,
        ordered=True,
        state=FutureState.FAILED,
        payload=None,
        result=None,
        error_message=message,
        error_category="user",
        token_count=0,
        created_at=now,
        finished_at=now,
    )


def chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def find(conn: Connection, model_id: str, seq_id: int) -> FutureRecord | None:
    """The request holding (model_id, seq_id), without its payload."""
    row = conn.execute(BY_MODEL_SEQ, {"model_id": model_id, "seq_id": seq_id}).mappings().first()
    return None if row is None else future_from_row(row)


def load(conn: Connection, request_id: str, owner: str) -> RowMapping:
    """The owner's request row without its payload. Raises NotFoundError for an unknown (or another's) request."""
    row = conn.execute(BY_ID_AND_OWNER, {"request_id": request_id, "owner": owner}).mappings().first()
    if row is None:
        raise NotFoundError(f"unknown request {request_id!r}")
    return row


def full_rows(conn: Connection, ids: Sequence[str]) -> list[RowMapping]:
    """Whole rows, payload included."""
    rows: list[RowMapping] = []
    for chunk in chunks(ids):
        rows.extend(conn.execute(FULL_BY_IDS, {"ids": chunk}).mappings().all())
    return rows
