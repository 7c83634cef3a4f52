"""Worker fixtures: a real SQLite store in tmp_path, a tiny model host, a worker and an api stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.worker.harness import Api, FakeClock, make_host, make_worker
from tinkerd.store import Store, default_url
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.loop import Worker


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = Store.open(default_url(tmp_path), clock=clock)
    yield opened
    opened.close()


@pytest.fixture
def host() -> ModelHost:
    return make_host()


@pytest.fixture
def notified() -> list[str]:
    return []


@pytest.fixture
def worker(store: Store, host: ModelHost, tmp_path: Path, clock: FakeClock, notified: list[str]) -> Worker:
    return make_worker(store, host, tmp_path / "data", clock, notified)


@pytest.fixture
def api(store: Store, clock: FakeClock) -> Api:
    return Api(store, clock)
