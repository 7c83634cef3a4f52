"""Shared test settings: no hub access, deterministic CPU threads."""

import os
from collections.abc import Iterator

import pytest

from tests.pg_server import PostgresServer, running_postgres

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session (tests/pg_server.py); each test makes its own database."""
    with running_postgres() as server:
        yield server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e/ is in the ``e2e`` tier, marked or not: a module that forgets its ``pytestmark``
    would otherwise put a server start-up into ``make test-fast``."""
    for item in items:
        if "e2e" in item.path.parts and item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)
