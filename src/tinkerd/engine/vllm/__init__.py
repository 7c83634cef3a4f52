"""vLLM as the sampling engine: a supervised vLLM server per base model, sampler versions as LoRA adapters.

The rest of tinkerd uses only what this module exports (an import-linter contract keeps it so): the worker's model
host samples through a ``VllmSampler``, the composition root starts a ``VllmBackend`` per model with
``start_backend``, and ``make vllm`` builds vLLM's environment (``venv.install``). vLLM itself is never imported:
it runs in its own environment as a subprocess and is spoken to over HTTP on loopback.
"""

from __future__ import annotations

from pathlib import Path

from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.vllm.engine import VllmConfig, VllmEngine, VllmStartError
from tinkerd.engine.vllm.sampler import VllmBackend, VllmSampler
from tinkerd.engine.vllm.venv import install, installed_python, venv_dir

__all__ = [
    "VllmBackend",
    "VllmConfig",
    "VllmEngine",
    "VllmSampler",
    "VllmStartError",
    "install",
    "installed_python",
    "start_backend",
    "venv_dir",
    "work_dir_for",
]


def start_backend(config: VllmConfig, base_model: str, warm_up: LoraWeights | None = None) -> VllmBackend:
    """Start vLLM for one base model and wait until it serves; raises VllmStartError (with its log's end) if not.

    ``warm_up``: a throwaway adapter of the model sent through once, so the first user's LoRA request is not slow."""
    engine = VllmEngine(config)
    engine.start()
    backend = VllmBackend(engine, base_model)
    try:
        if warm_up is not None:
            backend.warm_up(warm_up)
    except Exception as exc:
        backend.close()
        raise VllmStartError(f"vLLM started but could not sample through a LoRA adapter: {exc}") from exc
    except BaseException:
        backend.close()
        raise
    return backend


def work_dir_for(root: Path, base_model: str) -> Path:
    """Where the engine of ``base_model`` keeps its log and adapter directories, under a process's own ``root``."""
    return root / base_model.replace("/", "--").lstrip(".")
