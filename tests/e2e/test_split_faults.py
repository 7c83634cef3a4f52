"""Faults of a split deployment, with real processes: the official SDK against `tinkerd api`, two trainers and two
samplers on a PostgreSQL server of this module's own (one test restarts it). Processes die by SIGKILL: no shutdown
code runs and no lease is given back.

The tests share one deployment (starting the processes costs most of the time) and run in file order; each leaves
the deployment usable for the next, except that the sampler test ends with no sampler and the trainer test with one
trainer. In the default run only the trainer test runs (api + two trainers); the api, PostgreSQL and sampler tests
are `slow` (`make test-slow`): the SDK's own backoff while the api is away, and two more engine processes, make them
minutes.

To catch a request in flight deterministically, a process is frozen (SIGSTOP) the moment the ledger shows it holds
a request running, and killed while frozen: what it held is exactly what it was running when it died.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY
from tests.e2e.test_sdk_training import PROMPT, datum
from tests.pg_server import PostgresServer, running_postgres
from tests.split_deployment import SplitDeployment
from tinkerd.store import Store
from tinkerd.store.workers import WorkerRegistry

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

LEASE_S = 3.0
RESUME_ADVICE = "create_training_client_from_state_with_optimizer"
# Far above a lease: only a request that hangs reaches it.
RESULT_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def deployment(
    pg: PostgresServer, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SplitDeployment]:
    url = pg.create_database("faults")
    Store.open(url).close()  # the schema, before five processes race to create it
    found = SplitDeployment(tmp_path_factory.mktemp("faults"), url, str(tiny_model_dir), lease_s=LEASE_S)
    found.add_api()
    for name in ("trainer-a", "trainer-b"):
        found.add_worker("trainer", name)
    found.start()
    try:
        found.wait_ready()
        yield found
    finally:
        found.close()


@pytest.fixture(scope="module")
def samplers(deployment: SplitDeployment) -> SplitDeployment:
    """Two samplers joined to the deployment, for the tests that sample (the default run has none: fewer processes
    to start)."""
    names = ["sampler-1", "sampler-2"]
    for name in names:
        deployment.add_worker("sampler", name)
    deployment.start(names)
    deployment.wait_ready(names=names)
    return deployment


@pytest.fixture
def ledger(deployment: SplitDeployment) -> Iterator[Store]:
    store = Store.open(deployment.database_url)
    yield store
    store.close()


@pytest.fixture
def service(deployment: SplitDeployment) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=deployment.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def rows(store: Store, where: str, **params: object) -> list[Any]:
    sql = f"SELECT request_id, model_id, seq_id, kind, state, claimed_by, error_message FROM futures WHERE {where}"
    return list(store.db.read(lambda conn: conn.exec_driver_sql(sql, params).all()))


def outcome(future: Any) -> object:
    try:
        return future.result(timeout=RESULT_TIMEOUT_S)
    except Exception as error:  # the failure is the finding: the caller checks its message
        return error


def freeze_while_running(
    deployment: SplitDeployment, ledger: Store, submit: Callable[[], list[Any]], kind: str, candidates: tuple[str, ...]
) -> tuple[str, list[Any], list[Any]]:
    """Submit work until one of `candidates` holds some of it running; freeze that process there.
    Returns (the frozen process's name, its running rows, every future submitted)."""
    futures: list[Any] = []
    for _ in range(20):
        futures += submit()
        deadline = time.monotonic() + 3  # then submit more: this batch may have finished unseen
        while time.monotonic() < deadline:
            running = rows(ledger, "state = 'running' AND kind = %(kind)s", kind=kind)
            holders = [r.claimed_by for r in running if r.claimed_by in candidates]
            if holders:
                victim = holders[0]
                os.kill(deployment.process(victim).pid, signal.SIGSTOP)
                held = [r for r in rows(ledger, "state = 'running' AND kind = %(kind)s", kind=kind)]
                held = [r for r in held if r.claimed_by == victim]
                if held:
                    return victim, held, futures
                os.kill(deployment.process(victim).pid, signal.SIGCONT)  # it finished just before: again
            time.sleep(0.005)
    raise AssertionError(f"no {kind} request was ever seen running:\n{deployment.logs_text()}")


@pytest.mark.slow  # the SDK backs off 1, 2, 4, 8 s... while the api is away: tens of seconds
def test_a_killed_api_restarted_loses_nothing_acknowledged(
    deployment: SplitDeployment, ledger: Store, service: tinker.ServiceClient
) -> None:
    client = service.create_lora_training_client(base_model=deployment.model, rank=4, seed=3).result()
    adam = types.AdamParams(learning_rate=1e-2)
    sent = []
    for _ in range(5):
        sent.append(client.forward_backward([datum()], "cross_entropy"))
        sent.append(client.optim_step(adam))
    deployment.kill("api")  # some of those were acknowledged, some were on the wire
    time.sleep(1.0)
    deployment.start(["api"])  # the same command line: the same port
    deployment.wait_ready(names=["api"])
    results = [future.result(timeout=RESULT_TIMEOUT_S) for future in sent]  # the SDK's retries land
    losses = [r.metrics["loss:sum"] for r in results[::2]]
    assert losses[-1] < losses[0], losses  # five real steps, in order
    # Exactly once each: create_model and the ten calls, seq_ids 0..10, all completed.
    found = rows(ledger, "model_id = %(run)s ORDER BY seq_id", run=client.model_id)
    assert [(r.seq_id, r.state) for r in found] == [(seq, "completed") for seq in range(11)]
    assert client.forward_backward([datum()], "cross_entropy").result().metrics["loss:sum"] > 0


@pytest.mark.slow
def test_postgres_restarted_under_load_every_process_reconnects(
    samplers: SplitDeployment, ledger: Store, service: tinker.ServiceClient, pg: PostgresServer
) -> None:
    deployment = samplers
    clients = [
        service.create_lora_training_client(base_model=deployment.model, rank=4, seed=seed).result() for seed in (4, 5)
    ]
    sampling = service.create_sampling_client(base_model=deployment.model)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, stop=[])
    errors: list[str] = []
    calls = {client.model_id: 0 for client in clients}
    samples = [0]
    stop = threading.Event()

    def train(client: tinker.TrainingClient) -> None:
        while not stop.is_set():
            try:
                client.forward_backward([datum()], "cross_entropy").result(timeout=RESULT_TIMEOUT_S)
                client.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=RESULT_TIMEOUT_S)
                calls[client.model_id] += 2
            except Exception as error:
                errors.append(f"{client.model_id}: {type(error).__name__}: {error}")
                return

    def sample() -> None:
        while not stop.is_set():
            try:
                sampling.sample(types.ModelInput.from_ints(PROMPT), 2, params).result(timeout=RESULT_TIMEOUT_S)
                samples[0] += 1
            except Exception as error:
                errors.append(f"sample: {type(error).__name__}: {error}")
                return

    threads = [threading.Thread(target=train, args=(c,)) for c in clients] + [threading.Thread(target=sample)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    before = (dict(calls), samples[0])
    pg.restart("fast")  # every connection of every process is cut; transactions in progress roll back
    time.sleep(6.0)  # longer than a lease: heartbeats failed meanwhile, and nobody may be reaped for it
    stop.set()
    for thread in threads:
        thread.join(RESULT_TIMEOUT_S)
    assert errors == [], errors
    assert all(calls[run] > before[0][run] for run in calls) and samples[0] > before[1], (before, calls, samples)
    # Nothing acknowledged lost or doubled: each run's ledger is create_model plus the calls made, all completed.
    for run, made in calls.items():
        found = rows(ledger, "model_id = %(run)s ORDER BY seq_id", run=run)
        assert [(r.seq_id, r.state) for r in found] == [(seq, "completed") for seq in range(made + 1)]
    # Every process is alive and holds its lease; no run was reaped.
    assert all(deployment.alive(name) for name in deployment.members), deployment.logs_text()
    registry = WorkerRegistry(ledger.db)
    assert {w.id for w in registry.live()} >= {"trainer-a", "trainer-b", "sampler-1", "sampler-2"}
    assert "lost its lease" not in deployment.logs_text()


@pytest.mark.slow
def test_a_killed_samplers_requests_go_to_another_or_fail_clearly(
    samplers: SplitDeployment, ledger: Store, service: tinker.ServiceClient
) -> None:
    deployment = samplers
    sampling = service.create_sampling_client(base_model=deployment.model)
    prompt = types.ModelInput.from_ints(PROMPT)
    params = types.SamplingParams(max_tokens=64, temperature=1.0, stop=[])

    def submit() -> list[Any]:
        return [sampling.sample(prompt, 4, params) for _ in range(4)]

    # Two samplers: what the killed one was running is finished by the other.
    victim, held, futures = freeze_while_running(deployment, ledger, submit, "sample", ("sampler-1", "sampler-2"))
    deployment.kill(victim)
    other = ({"sampler-1", "sampler-2"} - {victim}).pop()
    for result in [outcome(f) for f in futures]:
        assert isinstance(result, types.SampleResponse), result
        assert len(result.sequences) == 4 and all(seq.tokens for seq in result.sequences)
    retried = rows(ledger, "request_id IN (" + ",".join(f"'{r.request_id}'" for r in held) + ")")
    assert {(r.state, r.claimed_by) for r in retried} == {("completed", other)}

    # The last sampler: what it was running fails, saying why, and so does a request sent after.
    last, held, futures = freeze_while_running(deployment, ledger, submit, "sample", (other,))
    deployment.kill(last)
    outcomes = [outcome(f) for f in futures]
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failed) >= len(held)
    for error in failed:
        assert isinstance(error, tinker.RequestFailedError), error
        assert f"no live sampler serves base model {deployment.model!r}" in str(error)
    late = outcome(sampling.sample(prompt, 1, params))
    assert isinstance(late, tinker.RequestFailedError) and "no live sampler serves" in str(late), late


def test_a_killed_trainer_fails_its_runs_with_advice_and_spares_the_others(
    deployment: SplitDeployment, ledger: Store, service: tinker.ServiceClient
) -> None:
    registry = WorkerRegistry(ledger.db)

    def trainer_of(run: str) -> str:
        return next(t for t in ("trainer-a", "trainer-b") if run in registry.runs_of(t))

    # Earlier tests left runs behind, so least-loaded placement may put two new runs on one trainer: make more.
    by_trainer: dict[str, tinker.TrainingClient] = {}
    for seed in range(20, 26):
        client = service.create_lora_training_client(base_model=deployment.model, rank=4, seed=seed).result()
        by_trainer.setdefault(trainer_of(client.model_id), client)
        if len(by_trainer) == 2:
            break
    assert len(by_trainer) == 2, f"six new runs all went to {set(by_trainer)}"
    doomed_trainer, doomed = "trainer-a", by_trainer["trainer-a"]
    survivor_trainer, survivor = "trainer-b", by_trainer["trainer-b"]
    adam = types.AdamParams(learning_rate=1e-2)
    doomed.forward_backward([datum()], "cross_entropy").result()
    doomed.optim_step(adam).result()
    saved = doomed.save_state("before-the-kill").result().path
    loss_at_save = doomed.forward([datum()], "cross_entropy").result().metrics["loss:sum"]

    # The other trainer's run trains throughout; it must never notice.
    survivor_errors: list[str] = []
    survivor_steps = [0]
    stop = threading.Event()

    def keep_training() -> None:
        while not stop.is_set():
            try:
                survivor.forward_backward([datum()], "cross_entropy").result(timeout=RESULT_TIMEOUT_S)
                survivor.optim_step(adam).result(timeout=RESULT_TIMEOUT_S)
                survivor_steps[0] += 1
            except Exception as error:
                survivor_errors.append(f"{type(error).__name__}: {error}")
                return

    trainer = threading.Thread(target=keep_training)
    trainer.start()

    def submit() -> list[Any]:
        return [doomed.forward_backward([datum()] * 8, "cross_entropy") for _ in range(8)]

    _, held, in_flight = freeze_while_running(deployment, ledger, submit, "forward_backward", (doomed_trainer,))
    held = [r for r in held if r.model_id == doomed.model_id]
    assert held, "the doomed trainer held none of its run's requests"
    deployment.kill(doomed_trainer)
    killed_at = time.monotonic()
    queued = [doomed.forward_backward([datum()], "cross_entropy") for _ in range(3)]  # sent to a dead trainer
    queued_outcomes = [outcome(f) for f in queued]
    failed_after_s = time.monotonic() - killed_at
    for result in queued_outcomes + [o for o in map(outcome, in_flight) if isinstance(o, Exception)]:
        assert isinstance(result, tinker.RequestFailedError), result
        assert RESUME_ADVICE in str(result) and doomed_trainer in str(result), result
    # What it was running when it died failed the same way (the SDK saw the failures above).
    ended = rows(ledger, "request_id IN (" + ",".join(f"'{r.request_id}'" for r in held) + ")")
    assert {r.state for r in ended} == {"failed"} and all(RESUME_ADVICE in r.error_message for r in ended)
    assert doomed_trainer not in {w.id for w in registry.live()}
    assert "trainer trainer-a lost its lease" in deployment.logs_text()

    # The resumed run lands on the live trainer, with the weights and optimizer state of the save.
    resumed = service.create_training_client_from_state_with_optimizer(saved).result()
    assert trainer_of(resumed.model_id) == survivor_trainer
    assert resumed.forward([datum()], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(
        loss_at_save, rel=1e-4
    )
    resumed.forward_backward([datum()], "cross_entropy").result()
    resumed.optim_step(adam).result()

    stop.set()
    trainer.join(RESULT_TIMEOUT_S)
    assert survivor_errors == [] and survivor_steps[0] > 0, survivor_errors
    found = rows(ledger, "model_id = %(run)s", run=survivor.model_id)
    assert {r.state for r in found} == {"completed"}
    print(f"the dead trainer's queued requests failed {failed_after_s:.1f} s after the kill (lease {LEASE_S} s)")
