"""Checkpoints: overwrite rules, publishing, TTL expiry, owner isolation, pagination."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.paths import CheckpointKind
from tinkerd.domain.records import Checkpoint
from tinkerd.store import Store

from .conftest import FakeClock, add_run

RUN = "s:train:0"


def save(
    store: Store,
    clock: FakeClock,
    name: str,
    kind: CheckpointKind = "weights",
    run_id: str = RUN,
    owner: str = DEFAULT_OWNER,
    size_bytes: int | None = None,
    user_metadata: dict[str, str] | None = None,
) -> Checkpoint:
    checkpoint = Checkpoint(run_id, kind, name, owner, clock(), size_bytes, user_metadata=dict(user_metadata or {}))
    return store.checkpoints.add(checkpoint)


@pytest.fixture
def runs(store: Store) -> None:
    add_run(store, RUN)
    add_run(store, "bob:train:0", owner="bob")


@pytest.mark.usefixtures("runs")
def test_add_get_and_overwrite(store: Store, clock: FakeClock) -> None:
    saved = save(store, clock, "step_10", size_bytes=1234, user_metadata={"epoch": "1"})
    assert store.checkpoints.get(saved.tinker_path, DEFAULT_OWNER) == saved
    assert store.checkpoints.get(saved.path, DEFAULT_OWNER) == saved
    with pytest.raises(ConflictError, match="overwrite"):
        save(store, clock, "step_10")
    replaced = store.checkpoints.add(Checkpoint(RUN, "weights", "step_10", DEFAULT_OWNER, clock()), overwrite=True)
    assert store.checkpoints.get(saved.path, DEFAULT_OWNER) == replaced
    # The same name under the other kind is a different checkpoint.
    save(store, clock, "step_10", kind="sampler_weights")


@pytest.mark.usefixtures("runs")
def test_checkpoints_need_a_run_of_the_same_owner(store: Store, clock: FakeClock) -> None:
    with pytest.raises(NotFoundError):
        save(store, clock, "x", run_id="bob:train:0")
    with pytest.raises(NotFoundError):
        save(store, clock, "x", run_id="nobody:train:0")
    with pytest.raises(InvalidRequestError):
        save(store, clock, "../escape")


@pytest.mark.usefixtures("runs")
def test_owner_isolation_and_publishing(store: Store, clock: FakeClock) -> None:
    theirs = save(store, clock, "final", kind="sampler_weights", run_id="bob:train:0", owner="bob")
    save(store, clock, "mine")
    denied = [
        lambda: store.checkpoints.get(theirs.path, DEFAULT_OWNER),
        lambda: store.checkpoints.list_for_run("bob:train:0", DEFAULT_OWNER),
        lambda: store.checkpoints.delete(theirs.path, DEFAULT_OWNER),
        lambda: store.checkpoints.set_public(theirs.path, DEFAULT_OWNER, True),
        lambda: store.checkpoints.set_expiry(theirs.path, DEFAULT_OWNER, None),
    ]
    for call in denied:
        with pytest.raises(NotFoundError):
            call()
    assert store.checkpoints.latest("bob:train:0", DEFAULT_OWNER, "sampler_weights") is None
    assert [c.name for c in store.checkpoints.list_for_owner(DEFAULT_OWNER).items] == ["mine"]
    assert store.checkpoints.storage_usage("bob") == (1, 0)

    store.checkpoints.set_public(theirs.path, "bob", True)
    assert store.checkpoints.get(theirs.path, DEFAULT_OWNER).public
    assert [c.name for c in store.checkpoints.list_for_run("bob:train:0", DEFAULT_OWNER).items] == ["final"]
    assert store.checkpoints.latest("bob:train:0", DEFAULT_OWNER, "sampler_weights") == store.checkpoints.get(
        theirs.path, "bob"
    )
    # Published is readable, not writable (the reader, who can see it, is told why), and not listed as their own.
    for call in denied[2:]:
        with pytest.raises(PermissionDeniedError):
            call()
    assert [c.name for c in store.checkpoints.list_for_owner(DEFAULT_OWNER).items] == ["mine"]
    store.checkpoints.set_public(theirs.path, "bob", False)
    with pytest.raises(NotFoundError):
        store.checkpoints.get(theirs.path, DEFAULT_OWNER)


def test_readable_sampler_checkpoints_are_ones_own_and_everyone_published(store: Store, clock: FakeClock) -> None:
    add_run(store, RUN)
    add_run(store, "bob:train:0", owner="bob", base_model="other-base")
    mine = save(store, clock, "mine", kind="sampler_weights")
    save(store, clock, "my-weights")  # training weights: not samplable
    hidden = save(store, clock, "private", kind="sampler_weights", run_id="bob:train:0", owner="bob")
    shared = save(store, clock, "shared", kind="sampler_weights", run_id="bob:train:0", owner="bob")
    store.checkpoints.set_public(shared.path, "bob", True)

    def readable(owner: str) -> list[tuple[str, str]]:
        return [(c.tinker_path, base) for c, base in store.checkpoints.readable_with_base(owner, "sampler_weights")]

    # Newest first, each with its run's base model; Bob's private one never shows to anyone else.
    assert readable(DEFAULT_OWNER) == [(shared.tinker_path, "other-base"), (mine.tinker_path, "tiny")]
    assert readable("bob") == [(shared.tinker_path, "other-base"), (hidden.tinker_path, "other-base")]
    assert readable("carol") == [(shared.tinker_path, "other-base")]
    assert [c.name for c, _ in store.checkpoints.readable_with_base("bob", "sampler_weights", limit=1)] == ["shared"]
    with pytest.raises(InvalidRequestError):
        store.checkpoints.readable_with_base("bob", "sampler_weights", limit=0)


@pytest.mark.usefixtures("runs")
def test_delete_returns_the_row_for_file_cleanup(store: Store, clock: FakeClock) -> None:
    saved = save(store, clock, "old", size_bytes=10)
    assert store.checkpoints.delete(saved.tinker_path, DEFAULT_OWNER) == saved
    with pytest.raises(NotFoundError):
        store.checkpoints.get(saved.path, DEFAULT_OWNER)
    with pytest.raises(NotFoundError):
        store.checkpoints.delete(saved.path, DEFAULT_OWNER)


@pytest.mark.usefixtures("runs")
def test_ttl_expiry_listing(store: Store, clock: FakeClock) -> None:
    soon = save(store, clock, "soon")
    later = save(store, clock, "later", run_id="bob:train:0", owner="bob")
    kept = save(store, clock, "kept")
    store.checkpoints.set_expiry(soon.path, DEFAULT_OWNER, clock.now + timedelta(hours=1))
    store.checkpoints.set_expiry(later.path, "bob", clock.now + timedelta(hours=3))
    store.checkpoints.set_expiry(kept.path, DEFAULT_OWNER, clock.now + timedelta(hours=1))
    store.checkpoints.set_expiry(kept.path, DEFAULT_OWNER, None)  # TTL removed
    assert store.checkpoints.list_expired() == []
    clock.advance(hours=2)
    assert [c.name for c in store.checkpoints.list_expired()] == ["soon"]
    clock.advance(hours=2)
    expired = store.checkpoints.list_expired()
    assert [c.name for c in expired] == ["soon", "later"]  # every owner's, soonest first
    assert all(c.expires_at is not None and c.expires_at < clock.now for c in expired)
    assert [c.name for c in store.checkpoints.list_expired(limit=1)] == ["soon"]


@pytest.mark.usefixtures("runs")
def test_pages_walk_every_checkpoint_once_newest_first(store: Store, clock: FakeClock) -> None:
    names = [f"step_{i:03d}" for i in range(11)]
    for name in names:
        save(store, clock, name, size_bytes=100)
    save(store, clock, "theirs", run_id="bob:train:0", owner="bob")
    for list_page in (
        lambda offset: store.checkpoints.list_for_owner(DEFAULT_OWNER, limit=4, offset=offset),
        lambda offset: store.checkpoints.list_for_run(RUN, DEFAULT_OWNER, limit=4, offset=offset),
    ):
        seen: list[str] = []
        offset: int | None = 0
        while offset is not None:
            page = list_page(offset)
            assert page.total_count == 11
            seen.extend(c.name for c in page.items)
            offset = page.next_offset
        assert seen == list(reversed(names))
    assert store.checkpoints.storage_usage(DEFAULT_OWNER) == (11, 1100)
    assert store.checkpoints.latest(RUN, DEFAULT_OWNER, "weights") == store.checkpoints.get(
        f"tinker://{RUN}/weights/step_010", DEFAULT_OWNER
    )
