"""Python 3.12 venvs holding the Baseten Loops SDK (``baseten-loops``) or its ``tinker`` shim
(``baseten-loops-tinker``), built once and cached under ``<tinkerd cache>/sdk-venvs/`` (``~/.cache/tinkerd``).

Both wheels need Python >= 3.12 (tinkerd runs on 3.11), and the shim installs a top-level ``tinker`` package, so
each gets its own venv. Built under a temporary name and renamed into place once the package imports; a lock file
keeps concurrent test runs from building the same venv twice. About 650 MB each; 1-3 minutes to build once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.e2e.sdk_venvs import SdkVenvError, _locked, clean_env, venvs_root

LOOPS_VERSION = "0.32.0"
SHIM_VERSION = "0.17.0"
INSTALL_TIMEOUT_S = 1800.0

# (venv name, requirement, import probe)
LOOPS = (f"loops-{LOOPS_VERSION}", f"baseten-loops=={LOOPS_VERSION}", "import baseten.loops")
SHIM = (f"loops-tinker-{SHIM_VERSION}", f"baseten-loops-tinker=={SHIM_VERSION}", "import tinker, baseten.loops")


def python312() -> Path | None:
    """A Python 3.12 interpreter: ``$TINKERD_PYTHON312``, pyenv's 3.12.x, or ``python3.12`` on PATH."""
    candidates: list[Path] = []
    if os.environ.get("TINKERD_PYTHON312"):
        candidates.append(Path(os.environ["TINKERD_PYTHON312"]))
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates.extend(sorted((pyenv_root / "versions").glob("3.12.*/bin/python3.12"), reverse=True))
    found = shutil.which("python3.12")
    if found:
        candidates.append(Path(found))
    return next((c for c in candidates if c.is_file()), None)


def _imports(python: Path, probe: str) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, env=clean_env(), timeout=300)
    return done.returncode == 0


def _run(command: list[str], what: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise SdkVenvError(f"{what} did not finish within {INSTALL_TIMEOUT_S:.0f} s: {error}") from None
    if done.returncode != 0:
        raise SdkVenvError(f"{what} failed (exit {done.returncode}):\n{(done.stdout + done.stderr).strip()[-3000:]}")


def loops_python(which: tuple[str, str, str], root: Path | None = None) -> Path:
    """The python of the venv ``which`` (LOOPS or SHIM), built on first use. SdkVenvError if it cannot be."""
    name, requirement, probe = which
    root = root or venvs_root()
    final = root / name
    python = final / "bin" / "python"
    if _imports(python, probe):
        return python
    base = python312()
    if base is None:
        raise SdkVenvError("no Python 3.12 found (set TINKERD_PYTHON312); the Loops SDK needs Python >= 3.12")
    with _locked(root / f"{name}.lock"):
        if _imports(python, probe):  # another run built it while we waited
            return python
        shutil.rmtree(final, ignore_errors=True)
        staging = final.with_name(f"{name}.building-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _run([str(base), "-m", "venv", str(staging)], f"creating a venv at {staging}")
            _run(
                [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 requirement],
                f"pip install {requirement} (needs the package registry once; the venv is cached afterwards)",
            )  # fmt: skip
            if not _imports(staging / "bin" / "python", probe):
                raise SdkVenvError(f"the new venv at {staging} cannot run {probe!r}")
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return python
