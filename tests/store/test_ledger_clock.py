"""Leases are judged by the database server's clock, so hosts whose clocks disagree agree on when one runs out."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.pg_server import PostgresServer
from tinkerd.domain.records import utc_now
from tinkerd.store import Store
from tinkerd.store.ledger_clock import LedgerClock
from tinkerd.store.workers import WorkerRegistry


def test_the_ledger_clock_reads_the_database_servers_time(db_url: str) -> None:
    store = Store.open(db_url)
    try:
        clock = LedgerClock(store.db)
        before = utc_now()
        read = clock()
        # on this machine the server shares our clock: the measured offset is the round trip's error only
        assert abs(clock.offset) < timedelta(seconds=1)
        assert before - timedelta(seconds=1) <= read <= utc_now() + timedelta(seconds=1)
        assert read.tzinfo is not None
    finally:
        store.close()


@pytest.mark.postgres
def test_a_host_whose_clock_is_behind_still_writes_leases_in_server_time(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (a SQLite ledger is a file on one host: its processes share one clock, and LedgerClock adds no offset)
    store = Store.open(postgres_server.create_database())
    try:
        skewed = utc_now() - timedelta(minutes=5)  # this host's clock runs five minutes behind the server's
        monkeypatch.setattr("tinkerd.store.ledger_clock.utc_now", lambda: skewed)
        clock = LedgerClock(store.db)
        assert abs(clock.offset - timedelta(0)) < timedelta(seconds=1)  # nothing measured yet
        assert abs(clock() - utc_now()) < timedelta(seconds=2)  # corrected to the server's time
        assert timedelta(minutes=4) < clock.offset < timedelta(minutes=6)
        registry = WorkerRegistry(store.db, clock)
        registry.register(worker_id="t1", role="trainer", host="h", pid=1, base_models={}, lease_s=10.0)
        # another process, with a correct clock, sees the lease as live: it was written in server time
        assert [w.id for w in WorkerRegistry(store.db).live("trainer")] == ["t1"]
    finally:
        store.close()
