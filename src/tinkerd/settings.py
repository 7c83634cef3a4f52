"""The one typed configuration of a tinkerd process, read once by the CLI and passed down.

Precedence: a command-line argument, then a `TINKERD_<FIELD>` environment variable, then the default.
To add a setting: add a field, read it in `Settings.load`, and document its variable here.

| field     | variable            | default                                             |
|-----------|---------------------|-----------------------------------------------------|
| cache_dir | TINKERD_CACHE_DIR   | the platform's user cache dir, e.g. ~/.cache/tinkerd |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import platformdirs

ENV_PREFIX = "TINKERD_"


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("tinkerd"))


@dataclass(frozen=True, slots=True)
class Settings:
    cache_dir: Path  # pulled models, the HF_HOME for clients, scratch space

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, *, cache_dir: Path | None = None) -> Settings:
        """Build settings from explicit arguments (None = not given), else `environ` (default os.environ)."""
        env = os.environ if environ is None else environ
        if cache_dir is None:
            from_env = env.get(f"{ENV_PREFIX}CACHE_DIR")
            cache_dir = Path(from_env) if from_env else default_cache_dir()
        # Absolute, because the CLI hands paths under it to other processes (HF_HOME for clients).
        return cls(cache_dir=cache_dir.expanduser().absolute())
