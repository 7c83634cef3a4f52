"""The split deployment end to end: the official SDK against `tinkerd api`, two `tinkerd trainer`s and a
`tinkerd sampler`, each its own process, sharing a real PostgreSQL and a checkpoint directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, free_port, stop_server
from tests.e2e.test_sdk_training import PROMPT, datum
from tests.pg_server import PostgresServer
from tinkerd.store import Store
from tinkerd.store.workers import WorkerRegistry

pytestmark = pytest.mark.postgres

_CLI = [sys.executable, "-c", "from tinkerd.cli import main; main()"]


@dataclass
class Deployment:
    url: str
    database_url: str
    storage: Path
    processes: dict[str, subprocess.Popen[str]]
    logs: Path
    model: str

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(self.logs.glob("*.log")))


def _start(name: str, args: list[str], logs: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TINKERD_THREADS": "1"}
    with (logs / f"{name}.log").open("w") as sink:
        return subprocess.Popen([*_CLI, *args], stdout=sink, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture
def deployment(postgres_server: PostgresServer, tiny_model_dir: Path, tmp_path: Path) -> Iterator[Deployment]:
    database_url = postgres_server.create_database("split")
    Store.open(database_url).close()  # the schema, before four processes race to create it
    storage = tmp_path / "storage"
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    common = ["--database-url", database_url, "--storage", str(storage), "--lease-s", "4"]
    worker = [*common, "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    processes = {
        "api": _start("api", ["api", *common, "--port", str(port)], logs),
        "trainer-a": _start("trainer-a", ["trainer", *worker, "--worker-id", "trainer-a"], logs),
        "trainer-b": _start("trainer-b", ["trainer", *worker, "--worker-id", "trainer-b"], logs),
        "sampler": _start("sampler", ["sampler", *worker, "--worker-id", "sampler-1"], logs),
    }
    found = Deployment(f"http://127.0.0.1:{port}", database_url, storage, processes, logs, str(tiny_model_dir))
    try:
        store = Store.open(database_url)
        registry = WorkerRegistry(store.db)
        deadline = time.monotonic() + 480  # four processes loading torch on a shared 2-core machine
        while True:
            roles = sorted(w.id for w in registry.live() if w.role != "api")
            try:
                up = httpx.get(f"{found.url}/api/v1/healthz", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                up = False
            if up and roles == ["sampler-1", "trainer-a", "trainer-b"]:
                break
            dead = [name for name, p in processes.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"the deployment did not start ({dead} exited):\n{found.logs_text()}")
            time.sleep(0.3)
        store.close()
        yield found
    finally:
        for process in processes.values():
            stop_server(process)


def test_the_sdk_trains_and_samples_across_api_trainers_and_sampler(deployment: Deployment) -> None:
    service = tinker.ServiceClient(base_url=deployment.url, api_key=API_KEY)
    first = service.create_lora_training_client(base_model=deployment.model, rank=4, seed=1).result()
    second = service.create_lora_training_client(base_model=deployment.model, rank=4, seed=2).result()

    store = Store.open(deployment.database_url)
    registry = WorkerRegistry(store.db)
    # Placement: the second run went to the trainer the first one left idle.
    held = {trainer: registry.runs_of(trainer) for trainer in ("trainer-a", "trainer-b")}
    assert sorted(len(runs) for runs in held.values()) == [1, 1], (held, deployment.logs_text())

    for client in (first, second):
        loss = client.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"]
        assert loss > 0
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    # A named sampler checkpoint and an ephemeral snapshot of the same weights, both sampled by the sampler process:
    # with the same seed they must give the same tokens and logprobs (the snapshot crossed processes intact).
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=11, stop=[])
    prompt = types.ModelInput.from_ints(PROMPT)
    saved = first.save_weights_for_sampler("split-e2e").result()
    named = (
        service.create_sampling_client(model_path=saved.path).result().sample(prompt, 1, params).result().sequences[0]
    )
    ephemeral_client = first.save_weights_and_get_sampling_client().result()
    ephemeral = ephemeral_client.sample(prompt, 1, params).result().sequences[0]
    assert (named.tokens, named.logprobs) == (ephemeral.tokens, ephemeral.logprobs)
    # The other run's weights differ: its snapshot samples differently (never the wrong weights).
    other = second.save_weights_and_get_sampling_client().result().sample(prompt, 1, params).result().sequences[0]
    assert other.logprobs != ephemeral.logprobs

    # Each request ran where it belongs: training on the run's trainer, sampling on the sampler.
    claimed = store.db.read(lambda conn: conn.exec_driver_sql("SELECT DISTINCT kind, claimed_by FROM futures").all())
    by_kind: dict[str, set[str]] = {}
    for kind, worker in claimed:
        by_kind.setdefault(kind, set()).add(worker)
    assert by_kind["sample"] == {"sampler-1"}
    assert by_kind["forward_backward"] == {"trainer-a", "trainer-b"}
    store.close()

    status = subprocess.run(
        [*_CLI, "status", "--database-url", deployment.database_url], capture_output=True, text=True, check=True
    )
    assert "trainer-a" in status.stdout and "sampler-1" in status.stdout and "live" in status.stdout
    service.close("success").result()
