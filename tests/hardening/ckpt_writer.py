"""Checkpoint saves that die by SIGKILL: helpers for test_faults, run in forked children of the test process.

Every tensor of version v (adapter and optimizer state) is filled with v, and the metadata says v, so a reader can
tell a whole checkpoint from a mix. ``kill_at(point)`` makes the process SIGKILL itself at the point-th boundary
of what a save does on disk: before and after each fsync, rename, atomic swap and directory removal.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinkerd.domain.ops import LoraConfig
from tinkerd.engine import atomic_dir, checkpoint
from tinkerd.engine.lora import LoraWeights

LORA = LoraConfig(rank=8, alpha=8.0, train_mlp=False, train_unembed=False)
HIDDEN = 64


def save_version(dest: Path, version: int) -> None:
    """An attention-only LoRA of a 2-layer, 64-wide model, plus optimizer state: five files, all equal to version."""
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    a = {name: torch.full((LORA.rank, HIDDEN), float(version)) for name in names}
    b = {name: torch.full((HIDDEN, LORA.rank), float(version)) for name in names}
    optimizer = {f"exp_avg.{i}": torch.full((256, 256), float(version)) for i in range(4)}
    checkpoint.save_checkpoint(
        dest, LoraWeights(LORA.rank, LORA.alpha, a, b), LORA, "tiny", optimizer, {"version": version}
    )


def kill_at(point: int, *, exchange: bool = True) -> None:
    """From now on, SIGKILL this process at the point-th boundary. ``exchange=False``: take the two-rename
    fallback of atomic_dir.install instead of the atomic swap."""
    passed = 0

    def boundary() -> None:
        nonlocal passed
        passed += 1
        if passed == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def hooked(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            boundary()
            result = function(*args, **kwargs)
            boundary()
            return result

        return call

    atomic_dir.fsync = hooked(atomic_dir.fsync)  # fsync_dir calls it too
    os.rename = hooked(os.rename)
    shutil.rmtree = hooked(shutil.rmtree)
    atomic_dir._exchange = hooked(atomic_dir._exchange) if exchange else (lambda a, b: False)  # type: ignore[assignment]


def in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked child; its wait status (os.waitstatus_to_exitcode: -9 for SIGKILL, 0 for success)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        code = 0
        try:
            work()
        except BaseException:
            code = 3
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
