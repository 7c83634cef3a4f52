"""Saving and loading weights through the worker: files, rows, conflicts, and resuming exactly where a run was."""

from __future__ import annotations

import pytest

from tests.worker.harness import Api, RequestFailed, datums, drain
from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.requests import PathResult
from tinkerd.engine.checkpoint import ADAPTER_WEIGHTS, OPTIMIZER_STATE
from tinkerd.worker.loop import Worker

pytestmark = pytest.mark.integration


def train_steps(api: Api, run: str, seeds: range) -> list[str]:
    """forward_backward + optim_step per seed; returns the forward_backward request ids."""
    ids = []
    for seed in seeds:
        ids.append(api.forward_backward(run, datums(seed)))
        api.optim_step(run)
    return ids


def saved_path(api: Api, request_id: str) -> str:
    result = api.result(request_id)
    assert isinstance(result, PathResult)
    return result.path


def test_save_then_resume_in_a_new_run_gives_the_same_next_loss(api: Api, worker: Worker) -> None:
    run = api.create_model()
    train_steps(api, run, range(0, 2))
    save = api.save(run, "step2", user_metadata={"step": 2})
    train_steps(api, run, range(2, 4))
    final = api.forward_backward(run, datums(4))
    drain(worker)
    path = saved_path(api, save)
    assert path == f"tinker://{run}/weights/step2"
    directory = worker.files.dir_of(api.store.checkpoints.get(path, api.owner).path)
    assert (directory / ADAPTER_WEIGHTS).is_file() and (directory / OPTIMIZER_STATE).is_file()
    row = api.store.checkpoints.get(path, api.owner)
    assert row.size_bytes and row.size_bytes > 0 and row.user_metadata == {"step": 2} and row.expires_at is None

    resumed, _ = api.create_from_state(1, path, with_optimizer=True)
    train_steps(api, resumed, range(2, 4))
    resumed_final = api.forward_backward(resumed, datums(4))
    drain(worker)
    assert api.loss(resumed_final) == pytest.approx(api.loss(final), rel=1e-6)

    # without the optimizer state the moments restart from zero: a different trajectory
    fresh_moments, _ = api.create_from_state(2, path, with_optimizer=False)
    train_steps(api, fresh_moments, range(2, 4))
    other_final = api.forward_backward(fresh_moments, datums(4))
    drain(worker)
    assert api.loss(other_final) != pytest.approx(api.loss(final), rel=1e-6)


def test_save_before_any_step_and_resume_with_its_empty_optimizer(api: Api, worker: Worker) -> None:
    run = api.create_model()
    save = api.save(run, "start")
    first = api.forward_backward(run, datums(0))
    drain(worker)
    resumed, _ = api.create_from_state(1, saved_path(api, save))
    again = api.forward_backward(resumed, datums(0))
    drain(worker)
    assert api.loss(again) == pytest.approx(api.loss(first), rel=1e-6)


def test_a_name_in_use_needs_overwrite_and_bad_names_are_refused(api: Api, worker: Worker) -> None:
    run = api.create_model()
    first = api.save(run, "ckpt")
    again = api.save(run, "ckpt")
    replaced = api.save(run, "ckpt", overwrite=True)
    escape = api.save(run, "../../etc")
    drain(worker)
    api.result(first)
    with pytest.raises(RequestFailed) as conflict:
        api.result(again)
    assert conflict.value.category == "user" and "overwrite=True" in conflict.value.message
    api.result(replaced)
    with pytest.raises(RequestFailed) as bad:
        api.result(escape)
    assert bad.value.category == "user" and "not valid" in bad.value.message
    assert not (worker.files.root.parent / "etc").exists()


def test_sampler_weights_hold_no_optimizer_and_cannot_resume_one(api: Api, worker: Worker) -> None:
    run = api.create_model()
    save = api.save(run, "for_sampling", kind="sampler_weights")
    drain(worker)
    path = saved_path(api, save)
    assert path == f"tinker://{run}/sampler_weights/for_sampling"
    assert not (worker.files.dir_of(api.store.checkpoints.get(path, api.owner).path) / OPTIMIZER_STATE).exists()
    _, load = api.create_from_state(1, path, with_optimizer=True)
    drain(worker)
    with pytest.raises(RequestFailed) as error:
        api.result(load)
    assert error.value.category == "user" and "no optimizer state" in error.value.message


def test_loading_a_missing_checkpoint_is_not_found(api: Api, worker: Worker) -> None:
    run = api.create_model()
    drain(worker)
    _, load = api.create_from_state(1, f"tinker://{run}/weights/never_saved")
    drain(worker)
    with pytest.raises(RequestFailed) as error:
        api.result(load)
    assert error.value.category == "user" and "never_saved" in error.value.message


def test_ttl_expiry_deletes_files_and_row(api: Api, worker: Worker) -> None:
    run = api.create_model()
    short = api.save(run, "short", ttl_seconds=3600)
    kept = api.save(run, "kept")
    drain(worker)
    short_path, kept_path = saved_path(api, short), saved_path(api, kept)
    short_dir = worker.files.dir_of(api.store.checkpoints.get(short_path, api.owner).path)
    assert short_dir.is_dir()
    worker.housekeeper.run()
    assert short_dir.is_dir()
    api.clock.advance(hours=2)
    report = worker.housekeeper.run()
    assert report.expired == (short_path,)
    assert not short_dir.exists()
    with pytest.raises(NotFoundError):
        api.store.checkpoints.get(short_path, api.owner)
    api.store.checkpoints.get(kept_path, api.owner)
