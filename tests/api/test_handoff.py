"""retrieve_future answers from the worker's hand-off (no ledger read), and only to the request's owner."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import MODEL, SERVED, Api
from tests.api.fake_worker import FakeWorker
from tinkerd.api import ApiSettings, InProcess, create_app, notify
from tinkerd.api.notify import RECENT_LIMIT, FutureNotifier
from tinkerd.domain.ops import ForwardResult
from tinkerd.domain.records import FutureRecord, FutureState
from tinkerd.domain.requests import Finished, Request
from tinkerd.store import Store


def test_a_handed_over_result_is_answered_before_the_ledger_has_it(api: Api) -> None:
    model_id = api.model()
    api.worker.pause()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    pending = api.store.futures.get(request_id, "local")
    value = ForwardResult(loss_fn_outputs=[], metrics={"loss:sum": 42.0})
    done = dataclasses.replace(pending, state=FutureState.COMPLETED, result=b"{}")
    notifier: FutureNotifier = api.client.app.state.ctx.notifier  # type: ignore[attr-defined]
    notifier.notify(request_id, Finished(done, value))
    # The answer is the handed-over object (the ledger still says pending, and its stored result would not decode).
    assert api.retrieve(request_id).json()["metrics"] == {"loss:sum": 42.0}
    assert api.store.futures.get(request_id, "local").state is FutureState.PENDING
    api.worker.resume()


def test_the_hand_off_is_owner_scoped_and_bounded(api: Api) -> None:
    model_id = api.model()
    api.worker.pause()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    record = dataclasses.replace(api.store.futures.get(request_id, "local"), state=FutureState.FAILED)
    notifier = FutureNotifier()
    notifier.notify(request_id, Finished(record))
    assert notifier.finished(request_id, "local") is not None
    assert notifier.finished(request_id, "mallory") is None
    for i in range(RECENT_LIMIT):
        notifier.notify(f"req-{i}", Finished(dataclasses.replace(record, request_id=f"req-{i}")))
    assert notifier.finished(request_id, "local") is None  # the oldest went first
    assert notifier.finished(f"req-{RECENT_LIMIT - 1}", "local") is not None
    api.worker.resume()


def test_requests_handed_to_the_worker_are_expected_until_notified(monkeypatch: pytest.MonkeyPatch) -> None:
    notifier = FutureNotifier()
    notifier.expect("a")
    assert notifier.expected("a") and not notifier.expected("b")
    notifier.notify("a")
    assert not notifier.expected("a")
    monkeypatch.setattr(notify, "EXPECTED_LIMIT", 2)
    for name in ("x", "y", "z"):
        notifier.expect(name)
    assert [notifier.expected(name) for name in ("x", "y", "z")] == [False, True, True]  # the oldest is forgotten


def test_a_notification_that_beats_its_expect_leaves_the_request_unexpected() -> None:
    """Through the ledger a fast worker's FINISHED event can reach the api before the submitting thread's expect:
    the request must not then be expected (a poll would skip its read and wait a whole poll interval)."""
    notifier = FutureNotifier()
    notifier.notify("fast")
    notifier.expect("fast")
    assert not notifier.expected("fast")
    notifier.expect("fast")  # the early note is used once: a later expect (a new hand-over) counts again
    assert notifier.expected("fast")
    notifier.expect("lost")
    notifier.wake_all()  # the listener reconnected: events may have been lost, polls must read the ledger
    assert not notifier.expected("lost")


def test_an_expected_request_finished_only_in_the_ledger_is_still_answered(api: Api) -> None:
    """The first look at the ledger is skipped for a request running here; the poll interval still reads it."""
    model_id = api.model()
    api.worker.pause()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    notifier: FutureNotifier = api.client.app.state.ctx.notifier  # type: ignore[attr-defined]
    assert notifier.expected(request_id)
    claimed = api.store.futures.claim_ready(look_first=False)
    assert [f.request_id for f in claimed.futures] == [request_id]
    api.store.futures.fail(request_id, "failed without a notification", "server")
    started = time.monotonic()
    body = api.retrieve(request_id).json()
    assert body["error"] == "failed without a notification"
    assert time.monotonic() - started < 1.5  # one poll interval (0.5 s here), well inside the 2 s long poll
    api.worker.resume()


def test_await_answer_returns_at_once_when_no_poll_waits() -> None:
    notifier = FutureNotifier()
    notifier.notify("nobody-waits")
    started = time.monotonic()
    assert not notifier.await_answer("nobody-waits", 5.0)
    assert time.monotonic() - started < 1.0


def test_await_answer_holds_the_worker_until_the_waiting_poll_has_answered(api: Api) -> None:
    """The worker's side of the hand-off: notify, then wait for the poll's answer to be sent before going on."""
    model_id = api.model()
    api.worker.pause()
    request_id = api.forward_backward(model_id, 1).json()["request_id"]
    notifier: FutureNotifier = api.client.app.state.ctx.notifier  # type: ignore[attr-defined]
    pending = api.store.futures.get(request_id, "local")
    done = dataclasses.replace(pending, state=FutureState.COMPLETED, result=b"{}")
    value = ForwardResult(loss_fn_outputs=[], metrics={"loss:sum": 7.0})
    answers: list[dict[str, object]] = []
    poll = threading.Thread(target=lambda: answers.append(api.retrieve(request_id).json()))
    poll.start()
    deadline = time.monotonic() + 10
    while request_id not in notifier._waiters:  # pyright: ignore[reportPrivateUsage]
        assert time.monotonic() < deadline, "the poll never started waiting"
        time.sleep(0.01)
    notifier.notify(request_id, Finished(done, value))
    started = time.monotonic()
    assert notifier.await_answer(request_id, 10.0)  # released by the answer (False: nobody waited, or timed out)
    assert time.monotonic() - started < 5.0
    poll.join(10)
    assert [answer["metrics"] for answer in answers] == [{"loss:sum": 7.0}]
    api.worker.resume()


def test_a_repeated_submit_is_not_handed_to_the_worker_again(store: Store) -> None:
    """The SDK resends a request with the same seq_id after a lost answer; a worker handed it twice would run it
    twice (a request claimed at submit reaches the worker only through the hand-over)."""
    handed: list[str] = []
    worker = FakeWorker(store, lambda _rid: None)

    def on_submit(future: FutureRecord, _request: Request) -> None:
        handed.append(future.request_id)
        worker.wake()

    app = create_app(
        store,
        SERVED,
        InProcess(FutureNotifier(), on_submit, claim_for="local"),
        ApiSettings(long_poll_s=2.0, poll_interval_s=0.5),
    )
    with TestClient(app, headers={"X-API-Key": "tml-test"}) as client:
        api = Api(client, worker, store)
        worker.start()
        try:
            session = api.session()
            body = {"session_id": session, "model_seq_id": 0, "base_model": MODEL, "lora_config": {"rank": 4}}
            first = api.ok("create_model", body)["request_id"]
            again = api.ok("create_model", body)["request_id"]
        finally:
            worker.stop()
    assert first == again
    assert handed == [first]
    assert store.futures.get(first, "local").claimed_by == "local"  # it was claimed at submit, for the worker
