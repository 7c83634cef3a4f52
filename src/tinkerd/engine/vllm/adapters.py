"""Sampler versions as vLLM LoRA adapters: one adapter name per version, loaded on first use, evicted LRU.

A sampler version is a frozen ``LoraWeights`` object (a snapshot, or a checkpoint read from disk): the same object is
the same version, so the registry keys on object identity and holds a reference, which keeps an ``id`` from being
reused while its entry lives. Each version is written once as a PEFT directory under the engine's work dir and
registered with vLLM (``/v1/load_lora_adapter``) under a name never used before: vLLM keeps serving the weights it
first read for a name, so a version is never overwritten in place, and a client pinned to a version keeps it.

Beyond ``capacity`` versions the least recently used one that no request is using is unloaded
(``/v1/unload_lora_adapter``) and its directory removed. A restarted engine (a new generation) has no adapters:
each version is loaded again on its next use.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.engine.checkpoint import write_peft_adapter
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.vllm.http import EngineRefused, EngineUnreachable, call

log = logging.getLogger(__name__)

# vLLM 0.32 refuses (HTTP 500, the engine stays up) an adapter of a module its implementation of the model has no LoRA
# wrapper for: "While loading <dir>, expected target modules in {...} but received [...]" (vllm/lora/lora_model.py)
_UNEXPECTED_MODULES = "expected target modules in"


def _unexpected_modules_message(vllm_message: str) -> str:
    received = vllm_message.split("but received", 1)[-1].split("]", 1)[0].strip(" [")
    modules = sorted({m.strip(" '\"").rsplit(".", 1)[-1] for m in received.split(",") if m.strip(" '\"")})
    why = f"vLLM's implementation of this model has no LoRA for {', '.join(modules) or 'some adapted modules'}"
    if "lm_head" in modules:
        why += (
            " (vLLM 0.32 adapts lm_head only for models that declare it, e.g. Llama, Qwen3, Qwen3-MoE, Qwen3.5; "
            "not Qwen2, Qwen2-MoE, Mistral or GPT-OSS): an adapter that trains the unembedding (train_unembed=True) "
            "cannot be sampled with --sampler vllm on this model; train with train_unembed=False, or run tinkerd "
            "with --sampler builtin"
        )
    else:
        why += "; run tinkerd with --sampler builtin for this adapter"
    return f"{why} (vLLM said: {vllm_message.split(', please check', 1)[0]})"


@dataclass(eq=False)
class _Version:
    name: str
    weights: LoraWeights
    directory: Path
    users: int = 0
    loaded_in: int = 0  # the engine generation it was loaded into (0: none yet)
    lock: threading.Lock = field(default_factory=threading.Lock)


class AdapterRegistry:
    def __init__(self, directory: Path, base_model: str, capacity: int, engine_url: Callable[[], str]) -> None:
        self.directory = directory
        self._engine_url = engine_url
        self.base_model = base_model
        self.capacity = capacity
        self._versions: OrderedDict[int, _Version] = OrderedDict()  # by id(weights), least recently used first
        self._lock = threading.Lock()
        self._names = itertools.count(1)
        self.loads = 0  # adapters handed to vLLM so far (for tests and the bench)

    def acquire(self, weights: LoraWeights) -> _Version:
        """The version of ``weights`` (registered now if new), marked in use until ``release``."""
        with self._lock:
            version = self._versions.get(id(weights))
            if version is None or version.weights is not weights:
                name = f"tinkerd-v{next(self._names)}"
                directory = self.directory / name
                shutil.rmtree(directory, ignore_errors=True)  # left by an earlier process using the same dir
                write_peft_adapter(directory, weights, self.base_model)
                version = _Version(name, weights, directory)
                self._versions[id(weights)] = version
            self._versions.move_to_end(id(weights))
            version.users += 1
            evicted = self._evictable()
        for old in evicted:
            self._unload(old)
        return version

    def release(self, version: _Version) -> None:
        with self._lock:
            version.users -= 1

    def ensure_loaded(self, version: _Version, base_url: str, generation: int) -> None:
        """Register the version with the engine of ``generation`` unless it already is there."""
        with version.lock:
            if version.loaded_in == generation:
                return
            body = {"lora_name": version.name, "lora_path": str(version.directory)}
            try:
                call(base_url, "POST", "/v1/load_lora_adapter", body, timeout=120.0)
            except EngineRefused as exc:
                if _UNEXPECTED_MODULES in str(exc):
                    raise InvalidRequestError(_unexpected_modules_message(str(exc))) from None
                if "already" not in str(exc).lower():  # loaded by a request that raced us: fine
                    raise
            version.loaded_in = generation
            self.loads += 1

    def drop(self, version: _Version) -> None:
        """Unload an idle version now (the warm-up adapter)."""
        with self._lock:
            if version.users or self._versions.get(id(version.weights)) is not version:
                return
            del self._versions[id(version.weights)]
        self._unload(version)

    def forget_engine(self) -> None:
        """Nothing is loaded any more (the engine restarted)."""
        with self._lock:
            for version in self._versions.values():
                version.loaded_in = 0

    def _evictable(self) -> list[_Version]:
        """Remove and return the least recently used idle versions beyond capacity (called under the lock)."""
        out: list[_Version] = []
        for key in list(self._versions):
            if len(self._versions) <= self.capacity:
                break
            version = self._versions[key]
            if version.users == 0:
                del self._versions[key]
                out.append(version)
        return out

    def _unload(self, version: _Version) -> None:
        with version.lock:
            if version.loaded_in:
                try:
                    call(self._engine_url(), "POST", "/v1/unload_lora_adapter", {"lora_name": version.name}, 30.0)
                except (EngineUnreachable, EngineRefused) as exc:
                    log.warning("unloading adapter %s from vLLM failed: %s", version.name, exc)
            version.loaded_in = 0
        shutil.rmtree(version.directory, ignore_errors=True)
        log.info("evicted sampler version %s from vLLM (least recently used)", version.name)
