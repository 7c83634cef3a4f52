"""The one typed configuration of a tinkerd process, read once by the CLI and passed down.

Precedence: a command-line argument, then a `TINKERD_<FIELD>` environment variable, then the default.

Each setting is written once, as a `Settings` field whose metadata (`Setting`: flag, variable, help, default as
shown) is the single source the rest derives from: `Settings.load` reads the variables by it, the `tinkerd serve`
options are built from it (`cli_options.settings_options`), and the README's Settings table is generated from it
(`settings_table()`; `scripts/settings_table.py` rewrites the README). To add a setting, add a field here with
`setting(...)`, then use it where the process is composed (`server.build`); `tests/unit/test_settings.py` checks
that the variable, the option and the README agree.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from tinkerd.domain.errors import SettingsError as SettingsError  # where callers of the settings look for it
from tinkerd.domain.ops import LOGPROB_DISTRIBUTIONS
from tinkerd.hub.catalog import DEFAULT_MODEL

ENV_PREFIX = "TINKERD_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_MB = 256
DEFAULT_MAX_QUEUED_PER_USER = 1024
DEFAULT_MAX_RUNS_PER_USER = 64
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("tinkerd"))


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("tinkerd"))


@dataclass(frozen=True, slots=True)
class Setting:
    """What a user sees of one setting: its `serve` flag, its variable, what it does and its default in words."""

    help: str
    shown_default: str
    flag: str = ""  # "" = --<field-name-with-dashes>
    variable: str = ""  # "" = TINKERD_<FIELD_NAME>
    minimum: int | None = None  # whole-number settings: the smallest accepted value
    maximum: int | None = None
    is_dir: bool = False  # a path that names a directory (the option refuses files)
    fallback: Callable[[], Any] | None = None  # the default when neither the flag nor the variable is given
    choices: tuple[str, ...] = ()  # text settings: the accepted values (any, if empty)


def setting(default: Any, help: str, shown_default: str, **rest: Any) -> Any:
    """A `Settings` field with its metadata: `name: type = setting(default, "what it does", "default in words")`."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, shown_default, **rest)})


@dataclass(frozen=True, slots=True)
class Settings:
    cache_dir: Path = setting(
        dataclasses.MISSING,  # required: the CLI resolves it, and so must anyone who builds Settings by hand
        "Where pulled models are kept (and the HF_HOME clients can use).",
        "the user cache dir, e.g. ~/.cache/tinkerd",
        is_dir=True,
        fallback=default_cache_dir,
    )
    data_dir: Path | None = setting(
        None,
        "Database and checkpoints.",
        "the user data dir, e.g. ~/.local/share/tinkerd",
        is_dir=True,
        fallback=default_data_dir,
    )
    host: str = setting(DEFAULT_HOST, "Address to listen on.", DEFAULT_HOST)
    port: int = setting(DEFAULT_PORT, "Port to listen on.", str(DEFAULT_PORT), minimum=0, maximum=65535)
    models: tuple[str, ...] = setting(
        (),
        "A pulled model id or a local Hugging Face model directory; repeat the flag (or separate by commas in the "
        "variable) to serve several.",
        f"the embedded default model, {DEFAULT_MODEL}",
        flag="--model",
        variable="TINKERD_MODEL",
    )
    device: str = setting("cpu", "Torch device of the engine.", "cpu")
    dtype: str | None = setting(
        None,
        "Training compute dtype of the frozen base model: auto, bfloat16, float32 or float16. auto takes bfloat16 "
        "where the device multiplies it natively (CUDA, CPUs with AMX or AVX512-BF16) and float32 elsewhere.",
        "auto",
    )
    keys_file: Path | None = setting(
        None,
        "File of '<api-key> <user>' lines; unknown keys get 401.",
        "none: single user, any API key is accepted",
        flag="--keys",
        variable="TINKERD_KEYS",
    )
    threads: int | None = setting(None, "Torch intra-op threads of the engine.", "one per core", minimum=1)
    # Limits instead of crashes (see the README's "Limits"): request size, and per-user caps on queued work and runs.
    max_body_mb: int = setting(
        DEFAULT_MAX_BODY_MB,
        "Largest request body in MiB (after zstd decompression); larger get 413.",
        str(DEFAULT_MAX_BODY_MB),
        minimum=1,
    )
    max_queued_per_user: int = setting(
        DEFAULT_MAX_QUEUED_PER_USER,
        "Unfinished requests per user; more get 429 and the SDK retries later (0: no cap).",
        str(DEFAULT_MAX_QUEUED_PER_USER),
        minimum=0,
    )
    max_runs_per_user: int = setting(
        DEFAULT_MAX_RUNS_PER_USER,
        "Training runs in open sessions per user; more get 429, not retryable (0: no cap).",
        str(DEFAULT_MAX_RUNS_PER_USER),
        minimum=0,
    )
    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS,
        "Largest image (width x height) an image chunk may hold; larger get 400 before they are decoded.",
        str(DEFAULT_MAX_IMAGE_PIXELS),
        minimum=1,
    )
    image_root: Path | None = setting(
        None,
        "Directory whose files image_asset_pointer chunks may name (paths and file: URLs, symlinks and '..' "
        "resolved); others get 400. data: URIs need none.",
        "none: pointer chunks read no files",
        is_dir=True,
    )
    sample_logprobs: str = setting(
        "tempered",
        "Which distribution sampled tokens' logprobs are under unless a client's X-Tinkerd-Sample-Logprobs header "
        "says: tempered (log_softmax(logits/T)), sampled (tempered, cut to top-k/top-p, renormalised) or model "
        "(log_softmax(logits), as forward() scores).",
        "tempered",
        choices=LOGPROB_DISTRIBUTIONS,
    )
    # One trainer across several processes (one per device) with torch.distributed (README "Training across devices").
    ranks: int = setting(
        1,
        "Processes one trainer spans, one per device (torch.distributed: gloo on cpu, NCCL on cuda, rank r on "
        "cuda:r); tinkerd starts ranks 1..N-1 itself. Under torchrun, WORLD_SIZE decides.",
        "1",
        minimum=1,
    )
    base_sharding: str = setting(
        "replicated",
        "How a trainer spanning several ranks holds its frozen base: replicated (a whole copy on every rank) or "
        "sharded (FSDP2: each rank keeps 1/N of every weight and gathers a layer while it computes; in serve, rank 0 "
        "also keeps a whole copy to sample from).",
        "replicated",
        choices=("replicated", "sharded"),
    )
    rank_timeout_s: int = setting(
        300,
        "Seconds a rank waits for the others in a collective before the trainer gives up on a silent rank (a dead "
        "one is noticed at once) and exits.",
        "300",
        minimum=1,
    )

    sample_scores: str = setting(
        "trainer",
        "Where sampled tokens' logprobs come from: trainer (each finished sample rescored by the training forward, so "
        "they equal forward()'s bit for bit; costs one forward pass per sample) or decoder (the fp32 decoder's own "
        "values: no extra pass; within ~1e-4 of forward() when training runs in fp32, up to ~0.2 with bf16).",
        "trainer",
        choices=("trainer", "decoder"),
    )
    # The sampling engine (README "Sampling with vLLM"): the builtin sampler, or a supervised vLLM server per model.
    sampler: str = setting(
        "builtin",
        "Sampling engine: builtin (tinkerd's own) or vllm (a vLLM server per served model, supervised by tinkerd, "
        "from the environment `make vllm` builds).",
        "builtin",
        choices=("builtin", "vllm"),
    )
    vllm_max_adapters: int = setting(
        16,
        "With --sampler vllm: sampler versions kept loaded as LoRA adapters; the least recently used beyond it are "
        "unloaded (and loaded again on their next use).",
        "16",
        minimum=1,
    )
    vllm_max_lora_rank: int = setting(
        64,
        "With --sampler vllm: the largest LoRA rank vLLM accepts (its --max-lora-rank: 8, 16, 32, 64, 128, 256, ...); "
        "vLLM reserves memory for it.",
        "64",
        minimum=1,
    )
    vllm_args: str = setting(
        "",
        "With --sampler vllm: more arguments for vLLM's server, appended last (e.g. "
        "--vllm-args='--dtype bfloat16 --gpu-memory-utilization 0.5').",
        "none",
    )

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else default_data_dir().absolute()

    @property
    def resolved_image_root(self) -> Path | None:
        """The image root with its symlinks resolved (what pointer paths are compared with); SettingsError unless it
        is an existing directory, so a mistyped root fails at startup rather than refusing every pointer."""
        if self.image_root is None:
            return None
        if not self.image_root.is_dir():
            raise SettingsError(f"image_root {str(self.image_root)!r} is not a directory")
        return self.image_root.resolve()

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, /, **given: Any) -> Settings:
        """Build settings from keyword arguments named like the fields (None = not given), else `environ` (default
        os.environ), else the fields' defaults."""
        env = os.environ if environ is None else environ
        known = {f.name: f for f in fields()}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise TypeError(f"Settings.load got unknown settings: {', '.join(unknown)}")
        values = {name: _read(field, given.get(name), env) for name, field in known.items()}
        return cls(**values)


def fields() -> tuple[dataclasses.Field[Any], ...]:
    """The settings in declaration order (each carries a `Setting` in its metadata)."""
    return dataclasses.fields(Settings)


def meta(field: dataclasses.Field[Any]) -> Setting:
    return field.metadata["setting"]


def flag_of(field: dataclasses.Field[Any]) -> str:
    return meta(field).flag or "--" + field.name.replace("_", "-")


def variable_of(field: dataclasses.Field[Any]) -> str:
    return meta(field).variable or ENV_PREFIX + field.name.upper()


def value_type(field: dataclasses.Field[Any]) -> type:
    """The type a setting holds, without `| None`: Path, str, int, or tuple for a list of strings."""
    hint = typing.get_type_hints(Settings)[field.name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def _read(field: dataclasses.Field[Any], given: Any, env: Mapping[str, str]) -> Any:
    """One setting's value: the argument, else the variable, else the fallback or the field's default; checked."""
    spec, variable, kind = meta(field), variable_of(field), value_type(field)
    value: Any = given if given not in (None, (), []) else None
    if value is None and env.get(variable):
        raw = env[variable]
        if kind is int:
            try:
                value = int(raw)
            except ValueError:
                raise SettingsError(f"{variable} must be a whole number, got {raw!r}") from None
        elif kind is tuple:
            value = [part.strip() for part in raw.split(",") if part.strip()]
        else:
            value = raw
    if value is None:
        value = spec.fallback() if spec.fallback is not None else field.default
    if value is None or value is dataclasses.MISSING:
        return None
    if kind is int:
        low, high = spec.minimum, spec.maximum
        if low is not None and high is not None and not low <= value <= high:
            raise SettingsError(f"{field.name} must be between {low} and {high}, got {value}")
        if low is not None and value < low:
            raise SettingsError(f"{field.name} must be at least {low}, got {value}")
    if spec.choices and value not in spec.choices:
        raise SettingsError(f"{field.name} must be one of {', '.join(spec.choices)}, got {value!r}")
    if kind is tuple:
        return tuple(value)
    if kind is Path:
        # Absolute, because the CLI hands paths under them to other processes (HF_HOME for clients, the server).
        return Path(value).expanduser().absolute()
    return value


def settings_table() -> str:
    """The README's Settings table (markdown), from the fields' metadata."""
    rows = ["| flag | variable | default | what it sets |", "|---|---|---|---|"]
    for field in fields():
        spec = meta(field)
        rows.append(f"| `{flag_of(field)}` | `{variable_of(field)}` | {spec.shown_default} | {spec.help} |")
    return "\n".join(rows) + "\n"
