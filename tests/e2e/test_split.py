"""The split deployment end to end: the official SDK against `tinkerd api`, two `tinkerd trainer`s and a
`tinkerd sampler`, each its own process, sharing a real PostgreSQL and a checkpoint directory."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY
from tests.e2e.test_sdk_training import PROMPT, datum
from tests.pg_server import PostgresServer
from tests.split_deployment import CLI, SplitDeployment, running
from tinkerd.store import Store
from tinkerd.store.workers import WorkerRegistry

pytestmark = pytest.mark.postgres


@pytest.fixture
def deployment(postgres_server: PostgresServer, tiny_model_dir: Path, tmp_path: Path) -> Iterator[SplitDeployment]:
    database_url = postgres_server.create_database("split")
    workers = [("trainer", "trainer-a"), ("trainer", "trainer-b"), ("sampler", "sampler-1")]
    with running(tmp_path, database_url, str(tiny_model_dir), workers, lease_s=4.0) as found:
        yield found


def test_the_sdk_trains_and_samples_across_api_trainers_and_sampler(deployment: SplitDeployment) -> None:
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

    # The console on the api role: its server page lists every process the ledger knows, live, with its lease, its
    # last heartbeat and the memory its health endpoint reports; the trainers recorded the steps' metrics; the
    # playground tokenizes with the model's tokenizer found on the api's host.
    headers = {"X-API-Key": API_KEY}
    page = httpx.get(f"{deployment.url}/console/api/server", headers=headers, timeout=30).json()
    roles = {r["id"]: r for r in page["roles"]}
    assert [r["role"] for r in page["roles"] if r["state"] == "live"] == ["api", "trainer", "trainer", "sampler"]
    for worker in ("trainer-a", "trainer-b", "sampler-1"):
        row = roles[worker]
        assert 0 < row["lease_left_s"] <= deployment.lease_s and row["heartbeat_age_s"] < deployment.lease_s, row
        assert row["rss_bytes"] > 0 and row["models"] == [deployment.model], row
    assert (roles["trainer-a"]["runs"], roles["trainer-b"]["runs"]) == (1, 1)
    for client in (first, second):
        url = f"{deployment.url}/api/v1/training_runs/{client.model_id}/metrics"
        rows = httpx.get(url, headers=headers, timeout=30).json()["rows"]
        assert [(r["kind"], r["step"]) for r in rows] == [("forward_backward", 0), ("optim_step", 0)]
        assert rows[0]["loss:sum"] > 0 and rows[1]["learning_rate"] == pytest.approx(1e-2)
    # ... and `tinkerd runs metrics` reads them from the ledger, for people without a browser.
    printed = subprocess.run(
        [*CLI, "runs", "metrics", first.model_id, "--csv", "--database-url", deployment.database_url],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert [line.split(",")[2] for line in printed.stdout.splitlines()[1:]] == ["forward_backward", "optim_step"]
    tokenized = httpx.post(
        f"{deployment.url}/console/api/tokenize", json={"model": deployment.model, "text": "Hello"}, headers=headers,
        timeout=120,
    )  # fmt: skip
    assert tokenized.status_code == 200 and tokenized.json()["pieces"][-1] == "Hello", tokenized.text

    status = subprocess.run(
        [*CLI, "status", "--database-url", deployment.database_url], capture_output=True, text=True, check=True
    )
    assert "trainer-a" in status.stdout and "sampler-1" in status.stdout and "live" in status.stdout
    service.close("success").result()
