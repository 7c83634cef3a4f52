"""Replacing a directory atomically: write a hidden sibling, then swap it into place.

A crash at any point leaves the old complete directory or the new complete one, never a mix. Directories whose names
start with "." beside the destination are ours (in-flight or stale writes).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path

STALE_AFTER_S = 3600.0
_SIDE_DIR = re.compile(r"^\.(?P<name>.+)\.tinkerd-(?P<kind>tmp|old)-[0-9a-f]{32}$")


def side_dir(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.tinkerd-{kind}-{uuid.uuid4().hex}"


def fsync_dir(path: Path) -> None:
    if os.name == "posix":  # Windows cannot open a directory to fsync it
        fsync(path)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@cache
def _renameat2() -> Callable[..., int] | None:
    try:  # glibc >= 2.28; absent on macOS, Windows, musl
        return ctypes.CDLL(None, use_errno=True).renameat2 if sys.platform == "linux" else None
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where the OS or filesystem can't."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = ctypes.c_int(-100), ctypes.c_uint(2)
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def install(tmp: Path, dest: Path) -> None:
    """Put the complete directory ``tmp`` at ``dest``; a crash at any point leaves the old or the new checkpoint."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)  # atomic; fails rather than merge if another writer got there first
        garbage = None
    elif _exchange(tmp, dest):
        garbage = tmp  # now holds the old checkpoint
    else:
        # No atomic swap here (macOS, Windows, some filesystems): park the old one where recover finds it should we
        # die before the second rename, so the old checkpoint comes back on the next load or save.
        garbage = side_dir(dest, "old")
        os.rename(dest, garbage)
        try:
            os.rename(tmp, dest)
        except Exception:
            os.rename(garbage, dest)  # still alive: put the old one straight back
            raise
    fsync_dir(dest.parent)
    if garbage is not None:
        shutil.rmtree(garbage, ignore_errors=True)


def recover(dest: Path) -> None:
    """Undo a fallback install that died between its two renames: bring the parked old checkpoint back."""
    if os.path.lexists(dest) or not dest.parent.is_dir():
        return
    parked = [p for p in dest.parent.glob(f".{glob.escape(dest.name)}.tinkerd-old-*") if _SIDE_DIR.match(p.name)]
    if parked:
        newest = max(parked, key=lambda p: p.stat().st_mtime)
        with contextlib.suppress(OSError):  # a read-only store: the caller reports the checkpoint as missing
            os.rename(newest, dest)
            fsync_dir(dest.parent)


def sweep_side_dirs(dest: Path) -> None:
    """Remove what crashed saves left: always for this checkpoint, after STALE_AFTER_S for its neighbours."""
    now = time.time()
    for path in dest.parent.iterdir():
        m = _SIDE_DIR.match(path.name)
        if m is None or not path.is_dir():
            continue
        own = m["name"] == dest.name
        try:
            stale = own or now - path.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:
            continue  # another save finished with it meanwhile
        # a parked old checkpoint is the only copy while its destination is missing: recover needs it
        if stale and (m["kind"] == "tmp" or os.path.lexists(dest.parent / m["name"])):
            shutil.rmtree(path, ignore_errors=True)
