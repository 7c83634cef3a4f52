"""The one typed configuration of a tinkerd process, read once by the CLI and passed down.

Precedence: a command-line argument, then a `TINKERD_<FIELD>` environment variable, then the default.
To add a setting: add a field, read it in `Settings.load`, and document its variable here.

| field     | variable            | default                                                     |
|-----------|---------------------|-------------------------------------------------------------|
| cache_dir | TINKERD_CACHE_DIR   | the platform's user cache dir, e.g. ~/.cache/tinkerd         |
| data_dir  | TINKERD_DATA_DIR    | the platform's user data dir, e.g. ~/.local/share/tinkerd    |
| host      | TINKERD_HOST        | 127.0.0.1                                                   |
| port      | TINKERD_PORT        | 8000                                                        |
| models    | TINKERD_MODEL       | the embedded default model (comma-separated for several)    |
| device    | TINKERD_DEVICE      | cpu                                                         |
| dtype     | TINKERD_DTYPE       | the engine's default training dtype (bfloat16)              |
| keys_file | TINKERD_KEYS        | none: single-user mode, any API key is accepted             |
| threads   | TINKERD_THREADS     | torch's default (one per core)                              |
| max_body_mb         | TINKERD_MAX_BODY_MB         | 256: larger request bodies get 413 (after zstd decompression) |
| max_queued_per_user | TINKERD_MAX_QUEUED_PER_USER | 1024 unfinished requests per user; more get 429 (0: no cap)   |
| max_runs_per_user   | TINKERD_MAX_RUNS_PER_USER   | 64 training runs in open sessions per user (0: no cap)        |
| sample_logprobs     | TINKERD_SAMPLE_LOGPROBS     | tempered (or sampled, model): sampled tokens' logprobs  |
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from tinkerd.domain.ops import LOGPROB_DISTRIBUTIONS, LogprobDistribution

ENV_PREFIX = "TINKERD_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_MB = 256
DEFAULT_MAX_QUEUED_PER_USER = 1024
DEFAULT_MAX_RUNS_PER_USER = 64


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("tinkerd"))


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("tinkerd"))


class SettingsError(ValueError):
    """A setting has a value that cannot be used (e.g. a port that is not a number)."""


@dataclass(frozen=True, slots=True)
class Settings:
    cache_dir: Path  # pulled models, the HF_HOME for clients, scratch space
    data_dir: Path | None = None  # the database and checkpoints; None = default_data_dir()
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    models: tuple[str, ...] = ()  # served model names or local HF directories; () = the embedded default
    device: str = "cpu"
    dtype: str | None = None  # compute dtype of the frozen base for training; None = the engine's default
    keys_file: Path | None = None
    threads: int | None = None  # torch intra-op threads of the engine; None = torch's default
    # Limits instead of crashes (see the README's "Limits"): request size, and per-user caps on queued work and runs.
    max_body_mb: int = DEFAULT_MAX_BODY_MB
    max_queued_per_user: int = DEFAULT_MAX_QUEUED_PER_USER  # 0: no cap
    max_runs_per_user: int = DEFAULT_MAX_RUNS_PER_USER  # 0: no cap
    # The distribution sampled tokens' logprobs are reported under when a request does not say (its
    # X-Tinkerd-Sample-Logprobs header): "tempered", "sampled" or "model" (see domain.ops.LogprobDistribution).
    sample_logprobs: LogprobDistribution = "tempered"

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_data_dir().absolute()

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        cache_dir: Path | None = None,
        data_dir: Path | None = None,
        host: str | None = None,
        port: int | None = None,
        models: Sequence[str] | None = None,
        device: str | None = None,
        dtype: str | None = None,
        keys_file: Path | None = None,
        threads: int | None = None,
        max_body_mb: int | None = None,
        max_queued_per_user: int | None = None,
        max_runs_per_user: int | None = None,
        sample_logprobs: str | None = None,
    ) -> Settings:
        """Build settings from explicit arguments (None = not given), else `environ` (default os.environ)."""
        env = os.environ if environ is None else environ

        def from_env(name: str) -> str | None:
            value = env.get(f"{ENV_PREFIX}{name}")
            return value if value else None

        def int_from_env(name: str) -> int | None:
            raw = from_env(name)
            try:
                return int(raw) if raw else None
            except ValueError:
                raise SettingsError(f"{ENV_PREFIX}{name} must be a whole number, got {raw!r}") from None

        def count(name: str, given: int | None, default: int, minimum: int) -> int:
            """A whole-number setting: the argument, else the variable, else the default; at least `minimum`."""
            if given is None:
                from_variable = int_from_env(name)
                given = default if from_variable is None else from_variable
            if given < minimum:
                raise SettingsError(f"{name.lower()} must be at least {minimum}, got {given}")
            return given

        if cache_dir is None:
            cache_dir = Path(from_env("CACHE_DIR") or default_cache_dir())
        if data_dir is None:
            data_dir = Path(from_env("DATA_DIR") or default_data_dir())

        if port is None:
            from_port = int_from_env("PORT")
            port = DEFAULT_PORT if from_port is None else from_port
        if not 0 <= port <= 65535:
            raise SettingsError(f"port must be between 0 and 65535, got {port}")
        if not models:
            models = [m.strip() for m in (from_env("MODEL") or "").split(",") if m.strip()]
        if keys_file is None:
            raw_keys = from_env("KEYS")
            keys_file = Path(raw_keys) if raw_keys else None
        if threads is None:
            threads = int_from_env("THREADS")
        if threads is not None and threads < 1:
            raise SettingsError(f"threads must be at least 1, got {threads}")
        reported = (sample_logprobs or from_env("SAMPLE_LOGPROBS") or "tempered").strip().lower()
        if reported not in LOGPROB_DISTRIBUTIONS:
            raise SettingsError(f"sample_logprobs must be one of {', '.join(LOGPROB_DISTRIBUTIONS)}, got {reported!r}")
        # Absolute, because the CLI hands paths under them to other processes (HF_HOME for clients, the server).
        return cls(
            cache_dir=cache_dir.expanduser().absolute(),
            data_dir=data_dir.expanduser().absolute(),
            host=host or from_env("HOST") or DEFAULT_HOST,
            port=port,
            models=tuple(models),
            device=device or from_env("DEVICE") or "cpu",
            dtype=dtype or from_env("DTYPE"),
            keys_file=keys_file.expanduser().absolute() if keys_file is not None else None,
            threads=threads,
            max_body_mb=count("MAX_BODY_MB", max_body_mb, DEFAULT_MAX_BODY_MB, 1),
            max_queued_per_user=count("MAX_QUEUED_PER_USER", max_queued_per_user, DEFAULT_MAX_QUEUED_PER_USER, 0),
            max_runs_per_user=count("MAX_RUNS_PER_USER", max_runs_per_user, DEFAULT_MAX_RUNS_PER_USER, 0),
            sample_logprobs=next(d for d in LOGPROB_DISTRIBUTIONS if d == reported),
        )
