"""The console's server page on a split deployment's api role: every process the ledger knows, with its lease,
last heartbeat, the runs each trainer holds and the memory its (real) health endpoint reports; and the playground's
tokenizers found on the api's host."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import SERVED
from tests.store.conftest import add_run
from tinkerd.api import ApiSettings, FutureNotifier, InProcess, create_app
from tinkerd.console import ConsoleConfig, mount_console
from tinkerd.console.tokens import Tokenizers
from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.records import utc_now
from tinkerd.roles.console import LedgerRoles, LocalTokenizerDirs
from tinkerd.roles.health import HealthServer
from tinkerd.store import Store
from tinkerd.store.workers import WorkerRegistry

LEASE_S = 30.0


@pytest.fixture
def health() -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, lambda: {"status": "ok", "role": "trainer"})
    server.start()
    yield server
    server.close()


def _closed_port_url() -> str:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/healthz"


def test_the_server_page_lists_the_ledgers_workers_with_leases_and_memory(store: Store, health: HealthServer) -> None:
    registry = WorkerRegistry(store.db)

    def register(worker_id: str, role: str, health_url: str | None, capacity: int = 0) -> None:
        registry.register(
            worker_id=worker_id, role=role, host="node-1", pid=4242, base_models={SERVED[0].name: {}},
            lease_s=LEASE_S, capacity=capacity, health_url=health_url,
        )  # fmt: skip

    register("trainer-old", "trainer", None)
    registry.stop("trainer-old")  # its lease ended: listed, as gone
    long_ago = WorkerRegistry(store.db, clock=lambda: utc_now() - timedelta(hours=2))
    long_ago.register(worker_id="api-before", role="api", host="node-1", pid=1, base_models={}, lease_s=LEASE_S)
    # ... but not a process gone for hours (an api restarted since, under a new id)
    register("sampler-1", "sampler", _closed_port_url())  # live in the ledger, but its health does not answer
    register("trainer-a", "trainer", health.url, capacity=4)
    register("api-1", "api", None)
    add_run(store, "a:train:0", "alice", base_model=SERVED[0].name)
    assert registry.place("a:train:0", SERVED[0].name) == "trainer-a"  # the only live trainer

    settings = ApiSettings(api_keys={"tml-alice": "alice"})
    app = create_app(store, SERVED, InProcess(FutureNotifier(), lambda _f, _r: None), settings)
    mount_console(app, ConsoleConfig(roles=LedgerRoles(registry, "api-1")))
    with TestClient(app) as client:
        roles = client.get("/console/api/server", headers={"X-API-Key": "tml-alice"}).json()["roles"]

    # Live processes first (api, trainers, samplers), then the gone ones.
    assert [(r["id"], r["role"], r["state"]) for r in roles] == [
        ("api-1", "api", "live"),
        ("trainer-a", "trainer", "live"),
        ("sampler-1", "sampler", "live"),
        ("trainer-old", "trainer", "gone"),
    ]
    by_id = {r["id"]: r for r in roles}
    for live in ("api-1", "trainer-a", "sampler-1"):
        row = by_id[live]
        assert 0 < row["lease_left_s"] <= LEASE_S and 0 <= row["heartbeat_age_s"] < LEASE_S
        assert (row["host"], row["pid"], row["models"]) == ("node-1", 4242, [SERVED[0].name])
    assert by_id["trainer-old"]["lease_left_s"] is None
    # Memory: the api's own, and what the trainer's health endpoint reported; none from a sampler that is silent.
    assert by_id["api-1"]["rss_bytes"] > 0 and by_id["trainer-a"]["rss_bytes"] > 0
    assert by_id["sampler-1"]["rss_bytes"] is None and by_id["trainer-old"]["rss_bytes"] is None
    assert (by_id["trainer-a"]["runs"], by_id["trainer-a"]["capacity"]) == (1, 4)
    assert by_id["sampler-1"]["runs"] is None


def test_the_playground_finds_tokenizers_on_the_api_host(tmp_path: Path) -> None:
    with_tokenizer, without = tmp_path / "with", tmp_path / "without"
    for directory in (with_tokenizer, without):
        directory.mkdir()
        (directory / "config.json").write_text("{}")
    (with_tokenizer / "tokenizer.json").write_text("{}")
    served = {str(with_tokenizer): object(), str(without): object(), "org/not-pulled-here": object()}
    dirs = LocalTokenizerDirs(served, tmp_path / "cache")
    assert dict(dirs.items()) == {str(with_tokenizer): with_tokenizer.resolve()}
    assert list(dirs) == [str(with_tokenizer)] and len(dirs) == 1
    with pytest.raises(KeyError):
        dirs[str(tmp_path)]  # a directory, but not a model any worker serves
    with pytest.raises(NotFoundError, match="no tokenizer for model 'org/not-pulled-here'"):
        Tokenizers(dirs).encode_text("org/not-pulled-here", "hi")
