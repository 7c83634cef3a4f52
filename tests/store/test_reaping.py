"""What the ledger does with the work of a split deployment's worker whose lease ran out, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime

from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.records import FutureState, RequestKind, Sampler
from tinkerd.store import Store
from tinkerd.store.sequencing import ClaimScope
from tinkerd.store.workers import WorkerRegistry

from .conftest import FakeClock, add_run, add_session

SAMPLER = "s1:sample:0"
SCOPE = ClaimScope(sample_base_models=("base",))


def setup(store: Store, clock: FakeClock, samplers: tuple[str, ...]) -> WorkerRegistry:
    add_session(store)
    created = datetime(2026, 1, 1, tzinfo=UTC)
    record = Sampler(id=SAMPLER, session_id="s1", owner=DEFAULT_OWNER, base_model="base", created_at=created)
    store.samplers.create(record)
    registry = WorkerRegistry(store.db, clock)
    for name in samplers:
        registry.register(worker_id=name, role="sampler", host="h", pid=1, base_models={"base": {}}, lease_s=10)
    return registry


def sample(store: Store) -> str:
    kind = RequestKind.SAMPLE
    return store.futures.submit(owner=DEFAULT_OWNER, model_id=SAMPLER, seq_id=None, kind=kind, payload=b"x").request_id


def claimed_by(store: Store, worker: str) -> list[str]:
    return [f.request_id for f in store.futures.claim_ready(worker_id=worker, scope=SCOPE).futures]


def test_a_lost_samplers_request_goes_to_another_sampler_once_then_fails(store: Store, clock: FakeClock) -> None:
    registry = setup(store, clock, ("sampler-1", "sampler-2"))
    request = sample(store)
    assert claimed_by(store, "sampler-1") == [request]
    registry.stop("sampler-1")  # as if its lease ran out
    assert registry.reap().retried_samples == [request]
    requeued = store.futures.get(request, DEFAULT_OWNER)
    assert requeued.state is FutureState.PENDING and requeued.error_message is None  # the loss is kept apart
    assert claimed_by(store, "sampler-2") == [request]
    registry.register(worker_id="sampler-3", role="sampler", host="h", pid=1, base_models={"base": {}}, lease_s=10)
    registry.stop("sampler-2")
    # A third sampler is live, but the request has now lost two: it may be what kills them.
    assert registry.reap().failed_samples == [request]
    failed = store.futures.get(request, DEFAULT_OWNER)
    assert failed.state is FutureState.FAILED
    assert "twice" in (failed.error_message or "") and "sampler-1" in (failed.error_message or "")
    assert "sampler-2" in (failed.error_message or "")


def test_sampling_requests_no_live_sampler_can_take_fail_naming_the_base_model(store: Store, clock: FakeClock) -> None:
    registry = setup(store, clock, ("sampler-1",))
    running = sample(store)
    assert claimed_by(store, "sampler-1") == [running]
    registry.stop("sampler-1")
    waiting = sample(store)  # sent after the only sampler died
    assert registry.reap(sample_grace_s=5).failed_samples == [running]  # the waiting one gets its grace
    clock.advance(seconds=6)
    assert registry.reap(sample_grace_s=5).failed_samples == [waiting]
    for request in (running, waiting):
        message = store.futures.get(request, DEFAULT_OWNER).error_message or ""
        assert "no live sampler serves base model 'base'" in message and "tinkerd sampler --model base" in message


def test_a_trainer_registering_again_loses_the_runs_its_previous_process_held(store: Store, clock: FakeClock) -> None:
    registry = WorkerRegistry(store.db, clock)
    registry.register(worker_id="t1", role="trainer", host="h", pid=1, base_models={"tiny": {}}, lease_s=10)
    add_run(store, "run-1")
    assert registry.place("run-1", "tiny") == "t1"
    queued = store.futures.submit(
        owner=DEFAULT_OWNER, model_id="run-1", seq_id=1, kind=RequestKind.FORWARD_BACKWARD, payload=b"x"
    )
    registry.register(worker_id="t1", role="trainer", host="h", pid=2, base_models={"tiny": {}}, lease_s=10)
    assert registry.runs_of("t1") == []
    registry.reap()
    failed = store.futures.get(queued.request_id, DEFAULT_OWNER)
    assert failed.state is FutureState.FAILED
    assert "create_training_client_from_state_with_optimizer" in (failed.error_message or "")


def test_a_trainer_is_woken_only_by_its_own_runs_work(store: Store, clock: FakeClock) -> None:
    from tinkerd.roles.wake_filter import TrainerEvents

    registry = WorkerRegistry(store.db, clock)
    for trainer in ("t1", "t2"):
        registry.register(worker_id=trainer, role="trainer", host="h", pid=1, base_models={"tiny": {}}, lease_s=10)
    add_run(store, "run-1")
    add_run(store, "run-2")
    assert registry.place("run-1", "tiny") == "t1"
    assert registry.place("run-2", "tiny") == "t2"
    add_run(store, "run-unplaced")
    t1 = TrainerEvents(registry, "t1")
    assert t1.concerns("train:run-1") and not t1.concerns("train:run-2")
    assert t1.concerns("train:run-unplaced")  # not placed yet: wake, the claim will tell
    assert t1.concerns("") and t1.concerns("run-2")  # anyone's work, and an older tinkerd's bare payload
    assert not t1.concerns("sample:sampler-1")
    registry.register(worker_id="t2", role="trainer", host="h", pid=2, base_models={"tiny": {}}, lease_s=10)
    assert registry.trainer_of("run-2") == "lost:t2"  # t2 restarted: its run is lost, never moved to t1
    assert not t1.concerns("train:run-2")
    assert TrainerEvents(registry, "t2").concerns("train:run-3-unknown")
