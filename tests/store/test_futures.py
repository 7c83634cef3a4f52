"""The futures ledger: idempotent submit, per-model seq_id order with gaps, restart, delivery, retention."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.records import FutureRecord, FutureState, RequestKind
from tinkerd.store import Store

from .conftest import FakeClock

FB = RequestKind.FORWARD_BACKWARD
M = "sess:train:0"


def submit(
    store: Store,
    seq_id: int | None,
    kind: RequestKind = FB,
    model_id: str = M,
    owner: str = DEFAULT_OWNER,
    payload: bytes = b"batch",
) -> FutureRecord:
    return store.futures.submit(owner=owner, model_id=model_id, seq_id=seq_id, kind=kind, payload=payload)


def claim_seqs(store: Store, per_model_limit: int = 64, unordered_limit: int = 64) -> list[tuple[str, int | None]]:
    claim = store.futures.claim_ready(per_model_limit=per_model_limit, unordered_limit=unordered_limit)
    return [(f.model_id, f.seq_id) for f in claim.futures]


def run_all(store: Store) -> list[tuple[str, int | None]]:
    """Claim what is ready and complete it, as a worker would."""
    claim = store.futures.claim_ready()
    for future in claim.futures:
        store.futures.complete(future.request_id, b"ok")
    return [(f.model_id, f.seq_id) for f in claim.futures]


def test_resubmitting_a_seq_id_returns_the_existing_request(store: Store) -> None:
    first = submit(store, 0, RequestKind.CREATE_MODEL)
    again = submit(store, 0, RequestKind.CREATE_MODEL, payload=b"retried")
    assert again.request_id == first.request_id
    assert claim_seqs(store) == [(M, 0)]


def test_concurrent_submits_of_one_seq_id_create_one_request(store: Store, db_url: str) -> None:
    # Two stores on one file stand in for two api processes; each runs several threads.
    other = Store.open(db_url)
    start = threading.Barrier(12)
    results: list[str] = []
    errors: list[BaseException] = []

    def race(target: Store) -> None:
        try:
            start.wait()
            results.append(submit(target, 7).request_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(store if i % 2 else other,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.close()
    assert not errors
    assert len(results) == 12 and len(set(results)) == 1


def test_requests_without_seq_id_never_collide(store: Store) -> None:
    first = submit(store, None, RequestKind.SAMPLE, model_id="sess:sample:0")
    second = submit(store, None, RequestKind.SAMPLE, model_id="sess:sample:0")
    assert first.request_id != second.request_id
    assert not first.ordered


def test_a_later_seq_id_waits_for_the_gap_to_fill(store: Store) -> None:
    submit(store, 0, RequestKind.CREATE_MODEL)
    assert run_all(store) == [(M, 0)]
    submit(store, 1)
    submit(store, 3)
    assert run_all(store) == [(M, 1)]
    assert run_all(store) == []  # 3 is pending but 2 has not arrived
    submit(store, 2)
    assert run_all(store) == [(M, 2), (M, 3)]


def test_chunks_sent_first_chunk_last_run_in_seq_order(store: Store) -> None:
    # The SDK posts a multi-chunk forward_backward concurrently and the first chunk last.
    store.futures.start_sequence(M, 1)
    for seq in (3, 4, 2):
        submit(store, seq)
    assert claim_seqs(store) == []
    submit(store, 1)
    assert claim_seqs(store) == [(M, 1), (M, 2), (M, 3), (M, 4)]


def test_nothing_more_of_a_model_runs_while_its_request_runs(store: Store) -> None:
    store.futures.start_sequence(M, 1)
    first = submit(store, 1)
    assert claim_seqs(store) == [(M, 1)]
    submit(store, 2, RequestKind.OPTIM_STEP)
    assert claim_seqs(store) == []  # seq 1 is still running
    store.futures.complete(first.request_id, b"ok")
    assert claim_seqs(store) == [(M, 2)]


def test_a_gap_in_one_model_does_not_hold_up_another(store: Store) -> None:
    submit(store, 1, model_id="a:train:0")  # waits for seq 0
    submit(store, 0, model_id="b:train:0", kind=RequestKind.CREATE_MODEL)
    assert claim_seqs(store) == [("b:train:0", 0)]


def test_a_failed_request_lets_its_model_go_on(store: Store) -> None:
    store.futures.start_sequence(M, 1)
    bad = submit(store, 1)
    submit(store, 2)
    claim = store.futures.claim_ready(per_model_limit=1)
    assert [f.seq_id for f in claim.futures] == [1]
    failed = store.futures.fail(bad.request_id, "token id 99999 is outside the vocabulary", "user")
    assert (failed.state, failed.error_category) == (FutureState.FAILED, "user")
    assert claim_seqs(store) == [(M, 2)]


def test_results_reported_out_of_order_still_advance_the_model(store: Store) -> None:
    store.futures.start_sequence(M, 1)
    for seq in (1, 2, 3):
        submit(store, seq)
    claim = store.futures.claim_ready()
    for future in reversed(claim.futures):
        store.futures.complete(future.request_id, b"ok")
    assert store.futures.next_seq(M) == 4


def test_claim_reports_where_each_chain_starts_and_respects_the_limit(store: Store) -> None:
    store.futures.start_sequence(M, 5)
    for seq in range(5, 10):
        submit(store, seq)
    claim = store.futures.claim_ready(per_model_limit=2)
    assert [f.seq_id for f in claim.futures] == [5, 6]
    assert claim.next_seq == {M: 5}
    assert all(f.state is FutureState.RUNNING and f.payload == b"batch" for f in claim.futures)


def test_sampling_requests_are_idempotent_but_unordered(store: Store) -> None:
    sampler = "sess:sample:0"
    late = submit(store, 1_000_000_005, RequestKind.SAMPLE, model_id=sampler)
    assert submit(store, 1_000_000_005, RequestKind.SAMPLE, model_id=sampler).request_id == late.request_id
    submit(store, 3, RequestKind.SAMPLE, model_id=sampler)
    assert sorted(seq for _, seq in claim_seqs(store) if seq is not None) == [3, 1_000_000_005]
    assert claim_seqs(store, unordered_limit=0) == []


def test_a_seq_id_the_model_already_passed_is_rejected(store: Store) -> None:
    store.futures.start_sequence(M, 1)
    submit(store, 1)
    run_all(store)
    store.futures.purge(delivered_for=timedelta(0), undelivered_for=timedelta(0))
    with pytest.raises(InvalidRequestError, match="already executed; the next one is 2"):
        submit(store, 1)


def test_reusing_a_seq_id_for_another_kind_or_owner_conflicts(store: Store) -> None:
    submit(store, 0, RequestKind.CREATE_MODEL)
    with pytest.raises(ConflictError, match="create_model"):
        submit(store, 0, RequestKind.OPTIM_STEP)
    with pytest.raises(ConflictError, match="already in use"):
        submit(store, 0, RequestKind.CREATE_MODEL, owner="mallory")


def test_requests_left_running_fail_at_restart(db_url: str, clock: FakeClock) -> None:
    first = Store.open(db_url, clock=clock)
    first.futures.start_sequence(M, 1)
    running = submit(first, 1)
    waiting = submit(first, 2)
    assert claim_seqs(first, per_model_limit=1) == [(M, 1)]
    first.close()  # the server dies with seq 1 running

    second = Store.open(db_url, clock=clock)
    assert second.futures.fail_in_flight("the server restarted while this request ran; please retry") == 1
    failed = second.futures.get(running.request_id, DEFAULT_OWNER)
    assert failed.state is FutureState.FAILED and failed.error_category == "server"
    assert failed.error_message is not None and "restarted" in failed.error_message
    assert second.futures.get(waiting.request_id, DEFAULT_OWNER).state is FutureState.PENDING
    assert claim_seqs(second) == [(M, 2)]  # the model goes on
    second.close()


def test_fail_in_flight_can_spare_other_workers(store: Store) -> None:
    submit(store, None, RequestKind.SAMPLE, model_id="x:sample:0")
    submit(store, None, RequestKind.SAMPLE, model_id="y:sample:0")
    store.futures.claim_ready(worker_id="w1", unordered_limit=1)
    store.futures.claim_ready(worker_id="w2", unordered_limit=1)
    assert store.futures.fail_in_flight("w1 restarted", worker_id="w1") == 1
    assert store.futures.fail_in_flight("everything restarted") == 1


def test_released_work_is_claimed_again(store: Store) -> None:
    store.futures.start_sequence(M, 1)
    submit(store, 1)
    claim = store.futures.claim_ready()
    assert store.futures.release(f.request_id for f in claim.futures) == 1
    assert claim_seqs(store) == [(M, 1)]


def test_results_stay_retrievable_after_delivery(store: Store) -> None:
    future = submit(store, 0, RequestKind.CREATE_MODEL)
    assert store.futures.get(future.request_id, DEFAULT_OWNER).state is FutureState.PENDING
    run_all(store)
    done = store.futures.get(future.request_id, DEFAULT_OWNER)
    assert (done.state, done.result, done.payload) == (FutureState.COMPLETED, b"ok", None)
    store.futures.mark_delivered(future.request_id, DEFAULT_OWNER)
    again = store.futures.mark_delivered(future.request_id, DEFAULT_OWNER)
    assert again.delivered and again.delivered_count == 2
    assert store.futures.get(future.request_id, DEFAULT_OWNER).result == b"ok"


def test_finishing_twice_or_delivering_early_conflicts(store: Store) -> None:
    future = submit(store, 0, RequestKind.CREATE_MODEL)
    with pytest.raises(ConflictError, match="has not finished"):
        store.futures.mark_delivered(future.request_id, DEFAULT_OWNER)
    run_all(store)
    with pytest.raises(ConflictError, match="already completed"):
        store.futures.fail(future.request_id, "late", "server")
    with pytest.raises(NotFoundError):
        store.futures.complete("req-unknown", b"")


def test_payload_is_read_only_when_asked_for(store: Store) -> None:
    future = submit(store, 0, RequestKind.CREATE_MODEL, payload=b"\x00\x01proto")
    assert store.futures.get(future.request_id, DEFAULT_OWNER).payload is None
    assert store.futures.get(future.request_id, DEFAULT_OWNER, with_payload=True).payload == b"\x00\x01proto"


def test_another_owner_cannot_see_or_touch_a_request(store: Store) -> None:
    future = submit(store, 0, RequestKind.CREATE_MODEL)
    run_all(store)
    with pytest.raises(NotFoundError):
        store.futures.get(future.request_id, "mallory")
    with pytest.raises(NotFoundError):
        store.futures.mark_delivered(future.request_id, "mallory")


def test_purge_removes_old_delivered_results_only(store: Store, clock: FakeClock) -> None:
    store.futures.start_sequence(M, 1)
    delivered, undelivered, pending = submit(store, 1), submit(store, 2), submit(store, None, RequestKind.SAMPLE)
    store.futures.claim_ready(per_model_limit=2, unordered_limit=0)
    store.futures.complete(delivered.request_id, b"ok")
    store.futures.complete(undelivered.request_id, b"ok")
    store.futures.mark_delivered(delivered.request_id, DEFAULT_OWNER)
    assert store.futures.purge(delivered_for=timedelta(hours=1)) == 0  # too recent
    clock.advance(hours=2)
    assert store.futures.purge(delivered_for=timedelta(hours=1)) == 1
    with pytest.raises(NotFoundError):
        store.futures.get(delivered.request_id, DEFAULT_OWNER)
    assert store.futures.get(undelivered.request_id, DEFAULT_OWNER).result == b"ok"
    assert store.futures.purge(delivered_for=timedelta(hours=1), undelivered_for=timedelta(hours=1)) == 1
    assert store.futures.get(pending.request_id, DEFAULT_OWNER).state is FutureState.PENDING
    # The model's sequence survives the purge of all its rows.
    submit(store, 3)
    assert claim_seqs(store, unordered_limit=0) == [(M, 3)]


def test_concurrent_workers_claim_each_request_once_in_seq_order(store: Store, db_url: str) -> None:
    # Two stores on one file stand in for two worker processes, each with two threads.
    other = Store.open(db_url)
    models = [f"m{i}:train:0" for i in range(3)]
    for model in models:
        store.futures.start_sequence(model, 1)
        for seq in range(1, 16):
            submit(store, seq, model_id=model)
    claimed: list[tuple[str, int | None]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(target: Store, name: str) -> None:
        try:
            idle = 0
            while idle < 50:
                claim = target.futures.claim_ready(worker_id=name, per_model_limit=3)
                with lock:  # recorded before completing: the model's next claim cannot happen earlier
                    claimed.extend((f.model_id, f.seq_id) for f in claim.futures)
                idle = 0 if claim.futures else idle + 1
                for future in claim.futures:
                    target.futures.complete(future.request_id, b"ok")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, f"w{i}")) for i, s in enumerate([store, other, store, other])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.close()
    assert not errors
    for model in models:
        assert [seq for m, seq in claimed if m == model] == list(range(1, 16))


def test_mark_delivered_many_counts_each_delivery_and_skips_unfinished(store: Store) -> None:
    done, again = submit(store, 0), submit(store, 1)
    assert len(store.futures.claim_ready().futures) == 2
    pending = submit(store, 2)
    store.futures.complete(done.request_id, b"ok")
    store.futures.complete(again.request_id, b"ok")
    ids = [done.request_id, again.request_id, again.request_id, pending.request_id, "req-unknown"]
    assert store.futures.mark_delivered_many(ids) == 2
    assert store.futures.get(done.request_id, DEFAULT_OWNER).delivered_count == 1
    assert store.futures.get(again.request_id, DEFAULT_OWNER).delivered_count == 2
    assert store.futures.get(pending.request_id, DEFAULT_OWNER).delivered_count == 0
    assert store.futures.mark_delivered_many([]) == 0


def test_a_gap_that_never_fills_is_given_up_after_the_timeout(store: Store, clock: FakeClock) -> None:
    first = submit(store, 0)
    store.futures.claim_ready()
    store.futures.complete(first.request_id, b"ok")
    waiting = [submit(store, 3), submit(store, 4)]  # seq_ids 1 and 2 never arrive
    assert store.futures.fill_stale_gaps(timedelta(minutes=10)) == {}  # not waited long enough
    assert claim_seqs(store) == []
    clock.advance(minutes=11)
    assert store.futures.fill_stale_gaps(timedelta(minutes=10)) == {M: [1, 2]}
    assert claim_seqs(store) == [(M, 3), (M, 4)]
    assert all(store.futures.get(w.request_id, DEFAULT_OWNER).state is FutureState.RUNNING for w in waiting)
    with pytest.raises(InvalidRequestError, match="never arrived"):
        submit(store, 1)  # the late arrival is told why
    assert store.futures.fill_stale_gaps(timedelta(minutes=10)) == {}


def test_no_gap_is_filled_while_the_next_seq_id_is_present(store: Store, clock: FakeClock) -> None:
    submit(store, 0)
    submit(store, 2)
    store.futures.claim_ready()  # seq 0 runs; seq 2 waits for 1, but 0 is running, not missing
    clock.advance(hours=1)
    assert store.futures.fill_stale_gaps(timedelta(minutes=10)) == {}


# -- claiming at submit (a worker in the api's process) ------------------------------------------------------------


def submit_claiming(store: Store, seq_id: int, kind: RequestKind = FB) -> tuple[FutureRecord, bool]:
    return store.futures.submit_or_find(
        owner=DEFAULT_OWNER, model_id=M, seq_id=seq_id, kind=kind, payload=b"batch", claim_for="local"
    )


def test_a_request_at_its_models_cursor_is_recorded_claimed_by_the_given_worker(store: Store) -> None:
    first, created = submit_claiming(store, 0, RequestKind.CREATE_MODEL)
    assert created and first.state is FutureState.RUNNING and first.claimed_by == "local"
    assert first.started_at is not None
    assert store.futures.get(first.request_id, DEFAULT_OWNER).state is FutureState.RUNNING
    # seq 1 arrives while seq 0 runs: it waits, pending, and no claim hands it out before seq 0 finishes.
    second, _ = submit_claiming(store, 1)
    assert second.state is FutureState.PENDING and second.claimed_by is None
    assert claim_seqs(store) == []
    store.futures.complete(first.request_id, b"ok")
    assert claim_seqs(store) == [(M, 1)]
    # Once the model has caught up, the next request is claimed at submit again.
    store.futures.complete(second.request_id, b"ok")
    third, _ = submit_claiming(store, 2)
    assert third.state is FutureState.RUNNING


def test_a_repeat_submit_is_not_new_and_is_not_claimed_twice(store: Store) -> None:
    first, created = submit_claiming(store, 0, RequestKind.CREATE_MODEL)
    again, created_again = submit_claiming(store, 0, RequestKind.CREATE_MODEL)
    assert created and not created_again
    assert again.request_id == first.request_id


def test_claimed_at_submit_is_failed_like_any_running_request_after_a_crash(store: Store) -> None:
    record, _ = submit_claiming(store, 0, RequestKind.CREATE_MODEL)
    assert store.futures.fail_in_flight("restarted", worker_id="local") == 1
    assert store.futures.get(record.request_id, DEFAULT_OWNER).state is FutureState.FAILED


def test_unordered_requests_are_never_claimed_at_submit(store: Store) -> None:
    record, _ = store.futures.submit_or_find(
        owner=DEFAULT_OWNER, model_id="s:sample:0", seq_id=3, kind=RequestKind.SAMPLE, payload=b"x", claim_for="local"
    )
    assert record.state is FutureState.PENDING


def test_the_admit_check_runs_in_the_submit_for_new_requests_only(store: Store) -> None:
    calls: list[int] = []

    def refuse(_conn: object) -> None:
        calls.append(1)
        raise InvalidRequestError("full")

    submit(store, 0, RequestKind.CREATE_MODEL)
    # A repeat passes without the check (the SDK's retry of a request already in the ledger).
    store.futures.submit_or_find(
        owner=DEFAULT_OWNER, model_id=M, seq_id=0, kind=RequestKind.CREATE_MODEL, payload=b"batch", admit=refuse
    )
    assert calls == []
    with pytest.raises(InvalidRequestError, match="full"):
        store.futures.submit_or_find(owner=DEFAULT_OWNER, model_id=M, seq_id=1, kind=FB, payload=b"batch", admit=refuse)
    assert calls == [1]
    assert run_all(store) == [(M, 0)]
    assert run_all(store) == []  # nothing of seq 1 was written
