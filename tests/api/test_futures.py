"""retrieve_future: long-poll then try_again, early wake-up by the notifier, errors, repeated delivery."""

from __future__ import annotations

import threading
import time

from tests.api.conftest import Api, MakeApi


def test_a_pending_future_answers_try_again_after_the_long_poll(make_api: MakeApi) -> None:
    api = make_api(long_poll_s=0.3, poll_interval_s=0.05)
    model_id = api.model()
    api.worker.pause()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    started = time.monotonic()
    body = api.retrieve(request_id).json()
    assert 0.25 <= time.monotonic() - started < 10.0
    assert body == {"type": "try_again", "request_id": request_id, "queue_state": "active"}
    api.worker.resume()
    assert api.result(request_id)["metrics"] == {"loss:sum": 3.0}


def test_the_notifier_wakes_a_waiting_poll_at_once(make_api: MakeApi) -> None:
    # Polling the ledger only every 10 s: an answer well before that must come from the worker's notification.
    api = make_api(long_poll_s=20.0, poll_interval_s=10.0)
    model_id = api.model()
    api.worker.pause()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    threading.Timer(0.3, api.worker.resume).start()
    started = time.monotonic()
    assert "metrics" in api.result(request_id)
    assert time.monotonic() - started < 8.0


def test_failed_requests_answer_error_and_category(api: Api) -> None:
    model_id = api.model()
    user = api.forward_backward(model_id, 1, loss_fn="fail_user").json()["request_id"]
    server = api.forward_backward(model_id, 2, loss_fn="fail_server").json()["request_id"]
    assert api.retrieve(user).json() == {"error": "loss fail_user failed", "category": "user"}
    assert api.retrieve(server).json()["category"] == "server"


def test_results_can_be_fetched_again(api: Api) -> None:
    model_id = api.model()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    assert api.result(request_id) == api.result(request_id)
    # Deliveries are noted in batches (api/deliveries.py), within about half a second.
    deadline = time.monotonic() + 10.0
    while api.store.futures.get(request_id, "local").delivered_count < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.store.futures.get(request_id, "local").delivered_count == 2


def test_unknown_request_is_404(api: Api) -> None:
    response = api.post("retrieve_future", {"request_id": "req-nope", "allow_metadata_only": True})
    assert response.status_code == 404
    assert response.json()["category"] == "user"


def test_shutdown_releases_waiting_polls(make_api: MakeApi) -> None:
    api = make_api(long_poll_s=20.0, poll_interval_s=10.0)
    model_id = api.model()
    api.worker.pause()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    notifier = api.client.app.state.ctx.notifier  # type: ignore[attr-defined]
    threading.Timer(0.3, notifier.close).start()
    started = time.monotonic()
    assert api.retrieve(request_id).json()["type"] == "try_again"
    assert time.monotonic() - started < 8.0
