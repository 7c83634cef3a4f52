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
