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

pytestmark = pytest.mark.postgres


@pytest.fixture
def split_api(postgres_server: PostgresServer) -> Iterator[Api]:
    url = postgres_server.create_database()
    api_store = Store.open(url)
    worker_store = Store.open(url)  # its own engine and connections, as another process would have
    worker = FakeWorker(worker_store, lambda _request_id: None)  # nothing in memory reaches the api
    # The ledger is re-read only every 30 s: a prompt answer can only come from the NOTIFY.
    app = create_app(
        api_store, SERVED, ThroughLedger(api_store.db.url), ApiSettings(long_poll_s=20.0, poll_interval_s=30.0)
    )
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
