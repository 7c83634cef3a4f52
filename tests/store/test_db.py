"""The database layer: schema versioning, SQLite pragmas, retry while another connection holds the write lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text

from tinkerd.store import Database, DatabaseBusyError, RetryPolicy, Store, default_url
from tinkerd.store.tables import SCHEMA_VERSION, schema_version, sessions


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def test_schema_creation_is_repeatable_and_records_the_version(db_url: str) -> None:
    db = Database(db_url)
    db.create_schema()
    db.create_schema()  # a second start finds the tables and the version
    assert db.read(lambda conn: conn.execute(select(schema_version.c.version)).scalar_one()) == SCHEMA_VERSION
    db.dispose()


def test_sqlite_pragmas_are_applied(sqlite_url: str) -> None:
    db = Database(sqlite_url, busy_timeout_ms=1234)
    db.create_schema()

    with db.engine.connect() as conn:
        journal_mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
        busy_timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()
        foreign_keys = conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one()
    assert (journal_mode, busy_timeout, foreign_keys) == ("wal", 1234, 1)
    db.dispose()


def test_timestamps_come_back_as_aware_utc(db_url: str) -> None:
    db = Database(db_url)
    db.create_schema()
    plus_two = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    row = {
        "id": "s",
        "owner": "o",
        "sdk_version": "",
        "tags": [],
        "user_metadata": {},
        "status": "active",
        "created_at": plus_two,
        "last_heartbeat_at": plus_two,
    }
    db.write(lambda conn: conn.execute(insert(sessions).values(row)))
    stored = db.read(lambda conn: conn.execute(select(sessions.c.created_at)).scalar_one())
    assert stored == plus_two and stored.tzinfo == UTC
    # Comparisons in SQL see the same instant whatever zone the bound value is in.
    earlier = datetime(2026, 3, 1, 9, 59, tzinfo=UTC)
    found = db.read(lambda conn: conn.execute(select(sessions.c.id).where(sessions.c.created_at > earlier)).all())
    assert len(found) == 1
    db.dispose()


def _hold_write_lock(path: str, seconds: float, started: threading.Event) -> None:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    started.set()
    time.sleep(seconds)
    holder.execute("COMMIT")
    holder.close()


def test_a_write_waits_out_another_connections_write_lock(sqlite_url: str) -> None:
    db_url = sqlite_url
    # busy_timeout far shorter than the lock: only our retry loop can get the write through.
    db = Database(db_url, busy_timeout_ms=20, retry=RetryPolicy(deadline_s=10))
    db.create_schema()
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(_sqlite_path(db_url), 0.4, started))
    holder.start()
    started.wait()
    begun = time.monotonic()
    db.write(lambda conn: conn.execute(text("UPDATE schema_version SET version = version")))
    holder.join()
    assert time.monotonic() - begun >= 0.3
    assert db.retries > 0
    db.dispose()


def test_a_write_gives_up_with_a_capacity_error_after_the_deadline(sqlite_url: str) -> None:
    db_url = sqlite_url
    db = Database(db_url, busy_timeout_ms=10, retry=RetryPolicy(deadline_s=0.3))
    db.create_schema()
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(_sqlite_path(db_url), 0.6, started))
    holder.start()
    started.wait()
    with pytest.raises(DatabaseBusyError, match="busy"):
        db.write(lambda conn: conn.execute(text("UPDATE schema_version SET version = version")))
    holder.join()
    db.dispose()


def test_reads_are_not_blocked_by_a_writer(sqlite_url: str) -> None:
    db_url = sqlite_url
    # WAL: a long-poll reading results must not wait for the worker's write transaction.
    db = Database(db_url, busy_timeout_ms=10, retry=RetryPolicy(deadline_s=0.2))
    db.create_schema()
    started = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(_sqlite_path(db_url), 0.5, started))
    holder.start()
    started.wait()
    assert db.read(lambda conn: conn.execute(select(schema_version.c.version)).scalar_one()) == SCHEMA_VERSION
    holder.join()
    db.dispose()


def test_default_url_creates_the_data_directory(tmp_path: Path) -> None:
    store = Store.open(default_url(tmp_path / "nested" / "data"))
    assert (tmp_path / "nested" / "data" / "tinkerd.db").exists()
    store.close()


def test_the_store_never_imports_torch_or_the_engine() -> None:
    code = (
        "import sys, tinkerd.store, tinkerd.store.store; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('tinkerd.engine')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
