"""The api's cache of training runs: one store lookup per run and owner, errors not cached, bounded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tinkerd.api.run_cache import RunCache
from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.records import TrainingRun

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def run(run_id: str, owner: str = "alice") -> TrainingRun:
    return TrainingRun(run_id, "sess", owner, "base", T0, T0)


def test_a_run_is_loaded_once_per_owner_and_misses_are_not_remembered() -> None:
    loads: list[tuple[str, str]] = []
    known = {("r1", "alice"): run("r1")}

    def load(run_id: str, owner: str) -> TrainingRun:
        loads.append((run_id, owner))
        try:
            return known[(run_id, owner)]
        except KeyError:
            raise NotFoundError(f"unknown training run {run_id!r}") from None

    cache = RunCache()
    assert cache.get("r1", "alice", load) == run("r1")
    assert cache.get("r1", "alice", load) == run("r1")
    for _ in range(2):  # another owner asking is a miss each time: it is never served alice's run
        with pytest.raises(NotFoundError):
            cache.get("r1", "bob", load)
    assert loads == [("r1", "alice"), ("r1", "bob"), ("r1", "bob")]


def test_the_least_recently_used_run_is_forgotten_past_the_limit() -> None:
    loads: list[str] = []

    def load(run_id: str, owner: str) -> TrainingRun:
        loads.append(run_id)
        return run(run_id, owner)

    cache = RunCache(limit=2)
    for run_id in ("a", "b", "a", "c", "a", "b"):
        cache.get(run_id, "alice", load)
    assert loads == ["a", "b", "c", "b"]


def test_touch_is_due_once_per_interval() -> None:
    cache = RunCache()
    every = timedelta(seconds=5)
    assert not cache.touch_due("r1", T0, T0 + timedelta(seconds=1), every)
    assert cache.touch_due("r1", T0, T0 + timedelta(seconds=6), every)
    # The write just made counts, not the stale value a cached run still carries.
    assert not cache.touch_due("r1", T0, T0 + timedelta(seconds=7), every)
    assert cache.touch_due("r1", T0, T0 + timedelta(seconds=12), every)
