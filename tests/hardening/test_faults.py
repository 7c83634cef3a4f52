"""Faults: a process killed with SIGKILL while writing a checkpoint, a full disk, an exception inside the engine, and
a database locked by another connection. Each must cost at most the request it hit, never data or the server."""

from __future__ import annotations

import os
import random
import resource
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.hardening.ckpt_writer import in_child, kill_at, save_version
from tests.hardening.live import PROTOBUF, start_live
from tests.hardening.protos import fwdbwd_bytes
from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.ops import ForwardResult
from tinkerd.domain.records import Session, utc_now
from tinkerd.engine.checkpoint import load_checkpoint
from tinkerd.engine.served_model import ForwardJob
from tinkerd.store import Store, default_url
from tinkerd.store.db import RetryPolicy

pytestmark = pytest.mark.integration


def _version(dest: Path) -> int | None:
    """The version of the checkpoint at dest (None if there is none); fails unless every tensor agrees with it."""
    try:
        loaded = load_checkpoint(dest, "cpu")
    except NotFoundError:
        return None
    version = loaded.metadata["version"]
    assert isinstance(version, int)
    assert loaded.optimizer_state is not None and len(loaded.optimizer_state) == 4
    tensors = [*loaded.weights.a.values(), *loaded.weights.b.values(), *loaded.optimizer_state.values()]
    assert all(bool((t == float(version)).all()) for t in tensors), f"checkpoint mixes versions (metadata {version})"
    return version


def _side_dirs(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-swap", "two-renames"])
def test_sigkill_at_every_point_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path: Path, exchange: bool) -> None:
    """A child process saves version v+1 over v and is SIGKILLed at the 1st, 2nd, ... boundary of its disk work,
    until a save runs to the end; after each death the checkpoint is whole, v or v+1. Leftovers of earlier deaths
    are swept by later saves, which adds boundaries: hence "until one runs to the end", not a fixed count."""
    dest = tmp_path / "run" / "weights" / "ckpt"
    assert in_child(lambda: save_version(dest, 1)) == 0
    version, outcomes = 1, []
    for point in range(1, 200):

        def save(point: int = point, next_version: int = version + 1) -> None:
            kill_at(point, exchange=exchange)
            save_version(dest, next_version)

        status = in_child(save)
        found = _version(dest)
        assert found in (version, version + 1), (point, found)
        outcomes.append(found - version)
        version = found
        if status == 0:
            break
        assert status == -signal.SIGKILL, (point, status)
    assert len(outcomes) >= 12  # the fsyncs of 4 files and a directory, the swap, the removal of the old copy
    assert set(outcomes[:-1]) == {0, 1}  # killed before the swap (old kept) and after it (new in place)
    assert _side_dirs(dest) == []  # the save that ran to the end swept every leftover


def test_sigkill_at_random_times_never_loses_a_finished_save(tmp_path: Path) -> None:
    """A child saves versions 1, 2, 3, ... in a loop and is killed from outside at random moments."""
    dest = tmp_path / "ckpt"
    rng = random.Random(6)
    done = 0
    for _round in range(8):
        progress = tmp_path / "progress"
        progress.write_text("")

        def loop(start: int = done + 1, progress: Path = progress) -> None:
            version = start
            while True:
                save_version(dest, version)
                with progress.open("a") as log:
                    log.write(f"{version}\n")
                version += 1

        pid = os.fork()
        if pid == 0:
            try:
                loop()
            finally:
                os._exit(1)
        deadline = time.monotonic() + 60
        while not progress.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.005)  # one save finished: the loop is in its stride
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL
        finished = max(map(int, progress.read_text().split()))
        found = _version(dest)
        assert found in (finished, finished + 1), (finished, found)  # never older than the last finished save
        done = found


def test_a_full_disk_fails_the_save_cleanly_and_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    """The child's files are capped at 64 KiB (RLIMIT_FSIZE): every write past that fails with EFBIG, as writes
    fail on a full disk. The save raises, the old checkpoint stays whole, and nothing is left beside it."""
    dest = tmp_path / "ckpt"
    assert in_child(lambda: save_version(dest, 1)) == 0
    error_file = tmp_path / "error"

    def save_capped() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
        _soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # the soft limit: it can be lifted again
        try:
            save_version(dest, 2)
        except Exception as error:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
            error_file.write_text(f"{type(error).__name__}: {error}")
            raise

    assert in_child(save_capped) == 3
    assert "File too large" in error_file.read_text()
    assert _version(dest) == 1 and _side_dirs(dest) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs where a live tinkerd keeps its checkpoints (its database stays on the ordinary disk)."""
    data_dir = tmp_path / "live"
    mount_point = data_dir / "checkpoints"
    mount_point.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield data_dir
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_disk_fails_the_request_with_a_clear_error(small_disk: Path) -> None:
    live = start_live(small_disk)
    try:
        run_id = live.run(rank=32)
        save = {"model_id": run_id, "path": "c1", "seq_id": live.next_seq(run_id)}
        path = live.result(live.ok("save_weights", save)["request_id"])["path"]
        checkpoints = small_disk / "checkpoints"
        used = sum(f.stat().st_size for f in checkpoints.rglob("*") if f.is_file())
        free = os.statvfs(checkpoints).f_bavail * os.statvfs(checkpoints).f_frsize
        filler = checkpoints / "filler"
        filler.write_bytes(b"\0" * max(0, free - used // 2))  # room for half a checkpoint
        save = {"model_id": run_id, "path": "c1", "seq_id": live.next_seq(run_id), "overwrite": True}
        failed = live.wait(live.ok("save_weights", save)["request_id"])
        assert "No space left on device" in failed["error"], failed
        # The run goes on, the old checkpoint still loads, and nothing half-written is left.
        assert sorted(p.name for p in (checkpoints / run_id / "weights").iterdir()) == ["c1"]
        body = fwdbwd_bytes(run_id, live.next_seq(run_id), [1, 2, 3])
        response = live.client.post("/api/v1/forward_backward", content=body, headers={"content-type": PROTOBUF})
        live.result(response.json()["request_id"])
        load = {"model_id": run_id, "path": path, "seq_id": live.next_seq(run_id), "optimizer": True}
        live.result(live.ok("load_weights", load)["request_id"])
        filler.unlink()
        save = {"model_id": run_id, "path": "c1", "seq_id": live.next_seq(run_id), "overwrite": True}
        live.result(live.ok("save_weights", save)["request_id"])
    finally:
        live.close()


def test_an_engine_exception_fails_only_its_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live = start_live(tmp_path / "live")
    try:
        victim, bystander = live.run(), live.run()
        host = next(iter(live.worker.runtime.hosts.values()))
        forward = host.served.forward
        armed = threading.Event()
        armed.set()

        def exploding(jobs: Sequence[ForwardJob]) -> list[ForwardResult]:
            if armed.is_set() and any(job.adapter_id == victim for job in jobs):
                raise RuntimeError("injected engine failure")
            return forward(jobs)

        monkeypatch.setattr(host.served, "forward", exploding)

        def fwdbwd(run_id: str) -> str:
            body = fwdbwd_bytes(run_id, live.next_seq(run_id), [1, 2, 3])
            response = live.client.post("/api/v1/forward_backward", content=body, headers={"content-type": PROTOBUF})
            return response.json()["request_id"]

        failed = live.wait(fwdbwd(victim))
        assert failed["category"] == "server" and "injected engine failure" in failed["error"]
        armed.clear()
        # The worker carries on: the same run's next request and another run's both succeed.
        for run_id in (victim, bystander):
            assert "loss_fn_outputs" in live.result(fwdbwd(run_id))
        sampler = live.sampler()

        def broken_step(*args: object, **kwargs: object) -> object:
            raise RuntimeError("injected sampler failure")

        monkeypatch.setattr(host.sampler, "step", broken_step)
        sample = {"sampling_session_id": sampler, "seq_id": 0, "num_samples": 1,
                  "prompt": {"chunks": [{"tokens": [1, 2]}]}, "sampling_params": {"max_tokens": 2}}  # fmt: skip
        failed = live.wait(live.ok("asample", sample)["request_id"])
        assert failed["category"] == "server" and "injected sampler failure" in failed["error"]
        # The sampler was rebuilt (the broken one is gone): the next sample works.
        assert "sequences" in live.result(live.ok("asample", {**sample, "seq_id": 1})["request_id"])
    finally:
        live.close()


def test_a_locked_database_is_waited_out(tmp_path: Path) -> None:
    """Another connection holds SQLite's write lock: writes wait (and retry) until it lets go, then succeed."""
    store = Store.open(default_url(tmp_path), busy_timeout_ms=50, retry=RetryPolicy(deadline_s=20.0))
    try:
        holder = sqlite3.connect(tmp_path / "tinkerd.db", isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held
        threading.Timer(1.0, holder.rollback).start()
        started = time.monotonic()
        now = utc_now()
        store.sessions.create(Session("s1", "alice", now, now))
        assert time.monotonic() - started >= 0.9  # it did wait for the lock...
        assert store.db.retries > 0  # ...by retrying, past SQLite's own 50 ms busy timeout
        assert store.sessions.get("s1", "alice").owner == "alice"
        holder.close()
    finally:
        store.close()


def test_a_database_locked_too_long_is_a_429_not_a_crash(tmp_path: Path) -> None:
    live = start_live(tmp_path / "live", busy_timeout_ms=50)
    try:
        live.store.db.retry = RetryPolicy(deadline_s=0.5)
        holder = sqlite3.connect(tmp_path / "live" / "tinkerd.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            busy = live.post("create_session", {"tags": []})
            assert busy.status_code == 429 and "busy" in busy.json()["error"], busy.text
        finally:
            holder.rollback()
            holder.close()
        assert live.post("create_session", {"tags": []}).status_code == 200
    finally:
        live.close()
