"""Store fixtures: a fresh SQLite file per test and a clock the test controls."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.pg_server import PostgresServer
from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.records import Session, TrainingRun
from tinkerd.store import Store, default_url


class FakeClock:
    """Starts at a fixed time and moves 1 ms per reading, so rows written one after another sort in that order."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store test runs on both backends: an SQLite file, and a fresh database on a real PostgreSQL server."""
    if request.param == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.create_database()
    return default_url(tmp_path)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return default_url(tmp_path)


@pytest.fixture
def store(db_url: str, clock: FakeClock) -> Iterator[Store]:
    opened = Store.open(db_url, clock=clock)
    yield opened
    opened.close()


def add_session(store: Store, session_id: str = "s1", owner: str = DEFAULT_OWNER) -> Session:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return store.sessions.create(Session(id=session_id, owner=owner, created_at=now, last_heartbeat_at=now))


def add_run(
    store: Store, run_id: str, owner: str = DEFAULT_OWNER, *, at: datetime | None = None, base_model: str = "tiny"
) -> TrainingRun:
    """A run of `owner`, in that owner's session (created on first use)."""
    session_id = f"sess-{owner}"
    try:
        store.sessions.get(session_id, owner)
    except NotFoundError:
        add_session(store, session_id, owner)
    now = at or datetime(2026, 1, 1, tzinfo=UTC)
    run = TrainingRun(
        id=run_id, session_id=session_id, owner=owner, base_model=base_model, created_at=now, last_request_at=now
    )
    return store.runs.create(run)
