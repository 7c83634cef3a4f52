"""Sessions, training runs and samplers: lifecycle, owner isolation and pagination."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ids import DEFAULT_OWNER, sampler_id, training_run_id
from tinkerd.domain.ops import LoraConfig
from tinkerd.domain.records import Checkpoint, Sampler, TrainingRun
from tinkerd.store import Store

from .conftest import FakeClock, add_run, add_session

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_heartbeats_keep_a_session_alive_and_silence_is_found(store: Store, clock: FakeClock) -> None:
    add_session(store, "quiet")
    add_session(store, "chatty")
    clock.advance(minutes=5)
    store.sessions.heartbeat("chatty", DEFAULT_OWNER)
    silent = store.sessions.find_silent(timedelta(minutes=2))
    assert [s.id for s in silent] == ["quiet"]
    closed = store.sessions.time_out("quiet", DEFAULT_OWNER, "no heartbeat for 5 minutes")
    assert closed.status == "timed_out" and closed.closed_at is not None
    assert store.sessions.find_silent(timedelta(minutes=2)) == []


def test_finishing_a_session_is_idempotent_and_stops_heartbeats(store: Store) -> None:
    add_session(store, "s")
    finished = store.sessions.finish("s", DEFAULT_OWNER, "success")
    assert (finished.status, finished.finish_reason) == ("finished", "success")
    assert store.sessions.finish("s", DEFAULT_OWNER, "errored") == finished
    assert store.sessions.heartbeat("s", DEFAULT_OWNER) == finished  # closed: the api answers 410
    with pytest.raises(InvalidRequestError):
        store.sessions.finish("s", DEFAULT_OWNER, "bored")  # type: ignore[arg-type]


def test_sessions_are_private_to_their_owner(store: Store) -> None:
    add_session(store, "mine")
    add_session(store, "theirs", owner="bob")
    assert store.sessions.get("mine", DEFAULT_OWNER).tags == ()
    for call in (
        lambda: store.sessions.get("theirs", DEFAULT_OWNER),
        lambda: store.sessions.heartbeat("theirs", DEFAULT_OWNER),
        lambda: store.sessions.finish("theirs", DEFAULT_OWNER, "success"),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert [s.id for s in store.sessions.list_for_owner(DEFAULT_OWNER).items] == ["mine"]
    with pytest.raises(ConflictError):
        add_session(store, "mine")


def test_runs_round_trip_and_retried_creates_return_the_stored_run(store: Store) -> None:
    add_session(store, "s")
    run = TrainingRun(
        id=training_run_id("s", 0),
        session_id="s",
        owner=DEFAULT_OWNER,
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        created_at=T0,
        last_request_at=T0,
        lora=LoraConfig(rank=8, alpha=16.0, seed=3, train_unembed=False),
        user_metadata={"k": "v"},
    )
    assert store.runs.create(run) == run
    assert store.runs.get(run.id, DEFAULT_OWNER) == run
    assert store.runs.create(run, exist_ok=True) == run
    with pytest.raises(ConflictError):
        store.runs.create(run)
    with pytest.raises(NotFoundError, match="session"):
        store.runs.create(TrainingRun("x:train:0", "nope", DEFAULT_OWNER, "tiny", T0, T0))


def test_runs_are_private_unless_they_publish_a_checkpoint(store: Store) -> None:
    add_run(store, "bob:train:0", owner="bob")
    add_run(store, "bob:train:1", owner="bob")
    with pytest.raises(NotFoundError):
        store.runs.get("bob:train:0", DEFAULT_OWNER)
    with pytest.raises(NotFoundError):
        store.runs.touch("bob:train:0", DEFAULT_OWNER)
    assert store.runs.list_for_owner(DEFAULT_OWNER).total_count == 0
    store.checkpoints.add(Checkpoint("bob:train:1", "sampler_weights", "final", "bob", T0))
    store.checkpoints.set_public("tinker://bob:train:1/sampler_weights/final", "bob", True)
    assert store.runs.get("bob:train:1", DEFAULT_OWNER, accessible=True).owner == "bob"
    with pytest.raises(NotFoundError):
        store.runs.get("bob:train:1", DEFAULT_OWNER)  # owned scope still excludes it
    accessible = store.runs.list_for_owner(DEFAULT_OWNER, accessible=True)
    assert [r.id for r in accessible.items] == ["bob:train:1"]


def test_run_pages_cover_every_run_once_newest_first(store: Store) -> None:
    for i in range(7):
        add_run(store, f"s:train:{i}", at=T0 + timedelta(seconds=i % 3))  # ties in created_at on purpose
    add_run(store, "other:train:0", owner="bob")
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = store.runs.list_for_owner(DEFAULT_OWNER, limit=3, offset=offset)
        assert page.total_count == 7 and page.limit == 3
        seen.extend(r.id for r in page.items)
        offset = page.next_offset
    assert sorted(seen) == sorted(f"s:train:{i}" for i in range(7)) and len(seen) == 7
    created = [store.runs.get(run_id, DEFAULT_OWNER).created_at for run_id in seen]
    assert created == sorted(created, reverse=True)
    with pytest.raises(InvalidRequestError):
        store.runs.list_for_owner(DEFAULT_OWNER, limit=0)


def test_touch_and_corruption_are_recorded(store: Store, clock: FakeClock) -> None:
    add_run(store, "s:train:0")
    later = T0 + timedelta(hours=3)
    store.runs.touch("s:train:0", DEFAULT_OWNER, later)
    store.runs.mark_corrupted("s:train:0", DEFAULT_OWNER)
    run = store.runs.get("s:train:0", DEFAULT_OWNER)
    assert (run.last_request_at, run.corrupted) == (later, True)


def test_session_view_lists_its_runs_and_samplers(store: Store) -> None:
    add_session(store, "s")
    add_session(store, "t", owner="bob")
    for seq in (0, 1):
        store.runs.create(TrainingRun(training_run_id("s", seq), "s", DEFAULT_OWNER, "tiny", T0, T0))
    sampler = Sampler(sampler_id("s", 0), "s", DEFAULT_OWNER, "tiny", T0, run_id="s:train:0", run_version=4)
    assert store.samplers.create(sampler) == sampler
    assert store.runs.ids_for_session("s", DEFAULT_OWNER) == ["s:train:0", "s:train:1"]
    assert store.samplers.ids_for_session("s", DEFAULT_OWNER) == ["s:sample:0"]
    assert store.runs.ids_for_session("s", "bob") == [] and store.samplers.ids_for_session("s", "bob") == []


def test_samplers_are_private_and_validated(store: Store) -> None:
    add_session(store, "s")
    from_checkpoint = Sampler("s:sample:1", "s", DEFAULT_OWNER, "tiny", T0, model_path="tinker://r/sampler_weights/a")
    store.samplers.create(from_checkpoint)
    assert store.samplers.get("s:sample:1", DEFAULT_OWNER) == from_checkpoint
    assert store.samplers.create(from_checkpoint, exist_ok=True) == from_checkpoint
    with pytest.raises(NotFoundError):
        store.samplers.get("s:sample:1", "bob")
    with pytest.raises(NotFoundError, match="session"):
        store.samplers.create(Sampler("s:sample:2", "s", "bob", "tiny", T0))
    with pytest.raises(InvalidRequestError):
        store.samplers.create(Sampler("s:sample:3", "s", DEFAULT_OWNER, "tiny", T0, model_path="tinker://../x/y"))
    with pytest.raises(InvalidRequestError, match="run_version"):
        store.samplers.create(Sampler("s:sample:4", "s", DEFAULT_OWNER, "tiny", T0, run_id="s:train:0"))
