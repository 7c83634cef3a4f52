"""Ledger events on PostgreSQL: LISTEN/NOTIFY wakes listeners when requests are submitted or finish, delivered only
on commit, and a listener whose connection is cut reconnects and says so."""

from __future__ import annotations

import queue
import time

import pytest
from sqlalchemy import text

from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.records import RequestKind
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
    listener = LedgerListener(
        pg_store.db.url,
        Callbacks(
            on_finished=lambda rid: events.put(("finished", rid)),
            on_submitted=lambda model: events.put(("submitted", model)),
        ),
    )
    listener.start()
    try:
        record = pg_store.futures.submit(
            owner=DEFAULT_OWNER, model_id="run-a", seq_id=None, kind=RequestKind.SAMPLE, payload=b"x"
        )
        assert _next(events) == ("submitted", "run-a")
        claim = pg_store.futures.claim_ready(worker_id="w")
        assert [f.request_id for f in claim.futures] == [record.request_id]
        assert events.empty()  # claiming announces nothing
        pg_store.futures.complete(record.request_id, b"done")
        assert _next(events) == ("finished", record.request_id)
        # The event comes after the commit: whoever is woken finds the result.
        assert pg_store.futures.get(record.request_id, DEFAULT_OWNER).result == b"done"
    finally:
        listener.close()
        pg_store.close()


def test_a_listener_whose_connection_is_cut_reconnects_and_asks_for_a_reread(pg_store: Store) -> None:
    events: queue.Queue[tuple[str, str]] = queue.Queue()
    listener = LedgerListener(
        pg_store.db.url,
        Callbacks(on_finished=lambda rid: events.put(("finished", rid)), on_reconnect=lambda: events.put(("re", ""))),
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
