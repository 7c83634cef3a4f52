"""Hardening fixtures: a live tinkerd per module, a watch on error logs, and a tally of fuzz cases for the summary."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from tests.hardening.fixtures import World, make_world
from tests.hardening.live import Live, start_live
from tinkerd.store.tables import futures

# Requests sent by the fuzz tests, by endpoint and status; printed at the end of the run (pytest_terminal_summary).
FUZZ_TALLY: Counter[tuple[str, int]] = Counter()


def tally(endpoint: str, status: int) -> None:
    FUZZ_TALLY[(endpoint, status)] += 1


class ErrorLog(logging.Handler):
    """Collects ERROR records of tinkerd's loggers: an internal error logged anywhere is a finding."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def server_failures(live: Live) -> list[tuple[str, str]]:
    """(kind, message) of every future that failed with an internal ("server") error."""
    query = select(futures.c.kind, futures.c.error_message).where(futures.c.error_category == "server")
    return [(row.kind, row.error_message) for row in live.store.db.read(lambda conn: conn.execute(query).all())]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A live tinkerd shared by a module's tests. On teardown: no future failed as "server", nothing was logged
    at ERROR level, and the server still answers a real request (it kept serving through everything)."""
    errors = ErrorLog()
    logger = logging.getLogger("tinkerd")
    logger.addHandler(errors)
    running = start_live(tmp_path_factory.mktemp("live"), max_runs_per_user=0)  # fuzzing makes many runs
    try:
        yield running
        assert server_failures(running) == []
        assert [r.getMessage() for r in errors.records] == []
        model_id = running.run()
        assert running.get("healthz").status_code == 200
        assert running.post("get_info", {"model_id": model_id}).status_code == 200
    finally:
        logger.removeHandler(errors)
        running.close()


@pytest.fixture(scope="module")
def world(live: Live) -> World:
    """Alice's and bob's sessions, runs, checkpoints and samplers in the module's live tinkerd."""
    return make_world(live)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FUZZ_TALLY:
        return
    by_endpoint: dict[str, Counter[int]] = {}
    for (endpoint, status), count in FUZZ_TALLY.items():
        by_endpoint.setdefault(endpoint, Counter())[status] += count
    total = sum(FUZZ_TALLY.values())
    terminalreporter.write_line(f"hardening fuzz: {total} requests sent to {len(by_endpoint)} endpoints")
    for endpoint, statuses in sorted(by_endpoint.items()):
        detail = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        terminalreporter.write_line(f"  {sum(statuses.values()):6d}  {endpoint}  ({detail})")
