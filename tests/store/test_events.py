"""Ledger events on PostgreSQL: LISTEN/NOTIFY wakes listeners when requests are submitted or finish, delivered only
on commit, and a listener whose connection is cut reconnects and says so."""

from __future__ import annotations

import dataclasses
import queue
import time

import pytest
from sqlalchemy import text

from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.records import FutureRecord, FutureState, RequestKind
from tinkerd.store import Store
from tinkerd.store.events import Callbacks, LedgerListener

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_store(postgres_server: object) -> Store:
    from tests.pg_server import PostgresServer

    assert isinstance(postgres_server, PostgresServer)
    return Store.open(postgres_server.create_database())


def _next(events: queue.Queue[tuple[str, str]], timeout: float = 5.0) -> tuple[str, str]:
    return events.get(timeout=timeout)


def test_submit_and_finish_are_announced_after_commit(pg_store: Store) -> None:
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    records: list[FutureRecord | None] = []
    listener = LedgerListener(
        pg_store.db.url,
        Callbacks(
            on_finished=lambda rid, record: records.append(record) or events.put(("finished", rid)),
            on_submitted=lambda model: events.put(("submitted", model)),
        ),
    )
    listener.start()
    try:
        record = pg_store.futures.submit(
            owner=DEFAULT_OWNER, model_id="run-a", seq_id=None, kind=RequestKind.SAMPLE, payload=b"x"
        )
        assert _next(events) == ("submitted", "sample:run-a")  # for samplers: trainers skip it
        claim = pg_store.futures.claim_ready(worker_id="w")
        assert [f.request_id for f in claim.futures] == [record.request_id]
        assert events.empty()  # claiming announces nothing
        pg_store.futures.complete(record.request_id, b"done")
        assert _next(events) == ("finished", record.request_id)
        # The event comes after the commit: whoever is woken finds the result.
        stored = pg_store.futures.get(record.request_id, DEFAULT_OWNER)
        assert stored.result == b"done"
        # and a small result rides along, so that a poll in another process can answer without reading
        assert records == [dataclasses.replace(stored, delivered_count=0, delivered_at=None)]
    finally:
        listener.close()
        pg_store.close()


def test_a_listener_whose_connection_is_cut_reconnects_and_asks_for_a_reread(pg_store: Store) -> None:
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    listener = LedgerListener(
        pg_store.db.url,
        Callbacks(
            on_finished=lambda rid, _record: events.put(("finished", rid)), on_reconnect=lambda: events.put(("re", ""))
        ),
    )
    listener.start()
    try:
        killed = pg_store.db.write(
            lambda conn: conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        )
        assert killed >= 1
        assert _next(events, 15.0) == ("re", "")
        record = pg_store.futures.submit(
            owner=DEFAULT_OWNER, model_id="run-b", seq_id=None, kind=RequestKind.SAMPLE, payload=b"x"
        )
        pg_store.futures.claim_ready(worker_id="w")
        started = time.monotonic()
        pg_store.futures.fail(record.request_id, "boom", "user")
        assert _next(events) == ("finished", record.request_id)
        assert time.monotonic() - started < 5.0
    finally:
        listener.close()
        pg_store.close()


def test_which_workers_a_submitted_event_concerns() -> None:
    from tinkerd.store import events as ledger_events

    for work, trainer, sampler in [
        ("train:run-a", True, False),
        ("sample:sampler-1", False, True),
        ("", True, True),  # released or reaped requests: anyone may claim them
        ("run-a", True, True),  # an older tinkerd's payload, the bare model id
    ]:
        assert ledger_events.concerns(work, ledger_events.TRAIN) is trainer
        assert ledger_events.concerns(work, ledger_events.SAMPLE) is sampler


def _finished(result: bytes | None, state: FutureState = FutureState.COMPLETED) -> FutureRecord:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return FutureRecord(
        request_id="req-1", owner="alice", model_id="run-1", seq_id=3, kind=RequestKind.FORWARD_BACKWARD,
        ordered=True, state=state, payload=None, result=result, error_message=None, error_category=None,
        token_count=12, created_at=now, started_at=now, finished_at=now, claimed_by="trainer-1",
    )  # fmt: skip


def test_a_finished_event_carries_the_record_when_it_fits() -> None:
    from tinkerd.store.finished_events import MAX_PAYLOAD_BYTES, finished_payload, parse_finished

    small = _finished(b'{"type":"ForwardResult","value":{"metrics":{"loss:sum":1.5}}}')
    assert parse_finished(finished_payload(small)) == ("req-1", small)
    failed = dataclasses.replace(small, state=FutureState.FAILED, result=None, error_message="boom \n \u00e9")
    failed = dataclasses.replace(failed, error_category="user")
    assert parse_finished(finished_payload(failed)) == ("req-1", failed)
    big = _finished(b'{"x":"' + b"a" * MAX_PAYLOAD_BYTES + b'"}')
    assert finished_payload(big) == "req-1"  # too big for a NOTIFY: the id alone, the poll reads the ledger
    assert parse_finished("req-1") == ("req-1", None)
    assert parse_finished("req-1\n{not json") == ("req-1", None)  # a body this version cannot read: read the ledger
    running = dataclasses.replace(small, state=FutureState.RUNNING)
    assert parse_finished(finished_payload(running)) == ("req-1", None)  # only finished records are answers
