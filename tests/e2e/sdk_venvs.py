"""Separate virtual environments holding other versions of the `tinker` SDK, built once and cached.

``sdk_python("0.25.0")`` returns the python of ``<tinkerd cache>/sdk-venvs/tinker-0.25.0/`` (``~/.cache/tinkerd`` by
default), creating it with pip from the package registry the first time. The venv is built under a temporary name
and renamed into place only once `tinker` imports with the right version, so a run killed halfway never leaves a
broken venv behind; a lock file keeps concurrent test runs from building the same venv twice.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinkerd.settings import Settings

INSTALL_TIMEOUT_S = 1200.0


class SdkVenvError(RuntimeError):
    """The venv could not be built (typically: the package registry is unreachable)."""


def venvs_root() -> Path:
    return Settings.load().cache_dir / "sdk-venvs"


def clean_env() -> dict[str, str]:
    # Nothing of this interpreter's environment may leak into the other venv's imports.
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    probe = subprocess.run(
        [str(python), "-I", "-c", "import tinker; print(tinker.__version__)"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise SdkVenvError(f"{what} did not finish within {INSTALL_TIMEOUT_S:.0f} s: {error}") from None
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()[-3000:]
        raise SdkVenvError(f"{what} failed (exit {done.returncode}):\n{output}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(version: str, final: Path) -> None:
    staging = final.with_name(f"{final.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # No pip inside: this interpreter's pip installs into it (`pip --python`), which is quicker than ensurepip.
        _run([sys.executable, "-m", "venv", "--without-pip", str(staging)], f"creating a venv at {staging}")
        python = staging / "bin" / "python"
        _run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--disable-pip-version-check",
             f"tinker=={version}"],
            f"pip install tinker=={version} (needs the package registry once; the venv is cached afterwards)",
        )  # fmt: skip
        found = _installed_version(python)
        if found != version:
            raise SdkVenvError(f"the new venv at {staging} imports tinker {found!r}, not {version}")
        # The venv only uses relative paths for what we run (bin/python finds pyvenv.cfg next to it), so it can move.
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sdk_python(version: str, root: Path | None = None) -> Path:
    """The python of a venv with exactly ``tinker==version`` installed; built on first use (about 15 s)."""
    root = root or venvs_root()
    final = root / f"tinker-{version}"
    python = final / "bin" / "python"
    if _installed_version(python) == version:
        return python
    with _locked(root / f"tinker-{version}.lock"):
        if _installed_version(python) == version:  # another run built it while we waited
            return python
        shutil.rmtree(final, ignore_errors=True)  # broken (e.g. its base interpreter is gone): build it afresh
        _build(version, final)
    return python
