"""The api with workers in other processes (dispatch ThroughLedger, on PostgreSQL): a long-poll is woken by the
ledger's NOTIFY when another connection finishes the request, not by re-reading the ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import SERVED, Api
from tests.api.fake_worker import FakeWorker
from tests.pg_server import PostgresServer
from tinkerd.api import ApiSettings, ThroughLedger, create_app
from tinkerd.store import Store
from tinkerd.store.workers import WorkerRegistry

pytestmark = pytest.mark.postgres


@pytest.fixture
def split_api(postgres_server: PostgresServer) -> Iterator[Api]:
    url = postgres_server.create_database()
    api_store = Store.open(url)
    worker_store = Store.open(url)  # its own engine and connections, as another process would have
    worker = FakeWorker(worker_store, lambda _request_id: None)  # nothing in memory reaches the api
    WorkerRegistry(worker_store.db).register(
        worker_id="fake", role="trainer", host="h", pid=1, base_models={SERVED[0].name: {}}, lease_s=600, capacity=1
    )
    # The ledger is re-read only every 30 s: a prompt answer can only come from the NOTIFY.
    app = create_app(api_store, SERVED, ThroughLedger(api_store), ApiSettings(long_poll_s=20.0, poll_interval_s=30.0))
    with TestClient(app, headers={"X-API-Key": "tml-test"}) as client:
        worker.start()
        try:
            yield Api(client, worker, api_store)
        finally:
            worker.stop()
    api_store.close()
    worker_store.close()


def test_a_result_finished_by_another_process_wakes_the_long_poll(split_api: Api) -> None:
    model_id = split_api.model()
    for seq_id in (1, 2, 3):
        started = time.monotonic()
        request_id = split_api.forward_backward(model_id, seq_id, [1, 2, 3, 4]).json()["request_id"]
        body = split_api.retrieve(request_id).json()
        assert body["metrics"] == {"loss:sum": 4.0}
        assert time.monotonic() - started < 10.0  # far under the 30 s re-read: the event woke it


def test_no_request_is_claimed_for_a_worker_at_submit(split_api: Api) -> None:
    split_api.worker.pause()
    session = split_api.session()
    body = {"session_id": session, "model_seq_id": 0, "base_model": SERVED[0].name, "lora_config": {"rank": 4}}
    request_id = split_api.ok("create_model", body)["request_id"]
    assert split_api.store.futures.get(request_id, "local").state.value == "pending"
    split_api.worker.resume()
    assert split_api.result(request_id)["model_id"]


def test_new_runs_are_placed_on_the_least_loaded_live_trainer(split_api: Api) -> None:
    registry = WorkerRegistry(split_api.store.db)
    facts = {SERVED[0].name: {}}
    for trainer in ("t1", "t2"):
        registry.register(worker_id=trainer, role="trainer", host="h", pid=1, base_models=facts, lease_s=60)
    registry.register(worker_id="t3", role="trainer", host="h", pid=1, base_models={"other/model": {}}, lease_s=60)
    runs = [split_api.model() for _ in range(4)]
    held = {trainer: registry.runs_of(trainer) for trainer in ("fake", "t1", "t2", "t3")}
    # Least loaded first (ties by name); "fake" has room for one run only, t3 serves another model.
    assert {trainer: len(r) for trainer, r in held.items()} == {"fake": 1, "t1": 2, "t2": 1, "t3": 0}
    assert sorted(run for r in held.values() for run in r) == sorted(runs)


def test_a_run_whose_trainer_lost_its_lease_fails_with_advice_to_resume(split_api: Api) -> None:
    registry = WorkerRegistry(split_api.store.db)
    registry.stop("fake")  # the fixture's trainer leaves: t1 is the only one
    registry.register(worker_id="t1", role="trainer", host="h", pid=1, base_models={SERVED[0].name: {}}, lease_s=60)
    model_id = split_api.model()
    split_api.worker.pause()
    queued = split_api.forward_backward(model_id, 1).json()["request_id"]
    registry.stop("t1")  # its lease ends now
    assert registry.reap().lost_runs == {"fake": [], "t1": [model_id]}
    body = split_api.retrieve(queued).json()
    assert "create_training_client_from_state_with_optimizer" in body["error"]
    later = split_api.forward_backward(model_id, 2).json()["request_id"]
    registry.reap()  # any live worker's next heartbeat
    assert "lease expired" in split_api.retrieve(later).json()["error"]
    split_api.worker.resume()
