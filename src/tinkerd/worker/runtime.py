"""What the worker holds in memory besides the models: which runs are loaded, and what each sampler samples.

The database knows every run and sampler ever created; memory holds only the live ones. A run's adapter lives in its
``ServedModel`` and is lost on restart (checkpoints are the durable form). A sampler resolves to its base model plus
one of: nothing (the base model), a checkpoint on disk (reloadable at any time, so only cached), or an in-memory
snapshot of a run (the only copy: kept until the sampler's session ends).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.paths import TinkerPath
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.served_model import Adapter
from tinkerd.worker.hosts import ModelHost


@dataclass(frozen=True)
class LoadedRun:
    run_id: str
    owner: str
    session_id: str
    base_model: str


@dataclass(frozen=True)
class SamplerSource:
    """What a sampler samples. ``snapshot`` is set for save_weights_and_get_sampling_client samplers."""

    sampler_id: str
    owner: str
    session_id: str
    base_model: str
    checkpoint: TinkerPath | None = None
    snapshot: LoraWeights | None = field(default=None, repr=False)


class WeightsCache:
    """A small LRU of sampler checkpoints read from disk, keyed by path and the checkpoint's creation time (so an
    overwritten checkpoint is read afresh)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[TinkerPath, datetime], LoraWeights] = OrderedDict()

    def get(self, path: TinkerPath, created_at: datetime, load: Callable[[], LoraWeights]) -> LoraWeights:
        key = (path, created_at)
        weights = self._items.get(key)
        if weights is None:
            weights = load()
            self.evict(path)
            self._items[key] = weights
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)  # requests already submitted keep their own reference
        self._items.move_to_end(key)
        return weights

    def evict(self, path: TinkerPath) -> None:
        for key in [k for k in self._items if k[0] == path]:
            del self._items[key]


def not_loaded_message(run_id: str) -> str:
    return (
        f"training run {run_id!r} is not loaded on this server (it restarted, or the run's session ended); "
        "create a new training client from one of its saved checkpoints, e.g. "
        "service_client.create_training_client_from_state_with_optimizer('tinker://<run>/weights/<name>')"
    )


class Runtime:
    def __init__(self, hosts: Mapping[str, ModelHost], weights_cache_size: int = 8) -> None:
        self.hosts = dict(hosts)
        self.runs: dict[str, LoadedRun] = {}
        self.samplers: dict[str, SamplerSource] = {}
        self.weights_cache = WeightsCache(weights_cache_size)

    def host(self, base_model: str) -> ModelHost:
        try:
            return self.hosts[base_model]
        except KeyError:
            served = ", ".join(sorted(self.hosts)) or "none"
            message = f"base model {base_model!r} is not served here; served models: {served}"
            raise InvalidRequestError(message) from None

    def training(self, run_id: str, owner: str) -> tuple[LoadedRun, ModelHost, Adapter]:
        """A loaded run of ``owner`` with its host and adapter, or a user error saying how to get it back."""
        run = self.runs.get(run_id)
        if run is None or run.owner != owner:
            raise NotFoundError(not_loaded_message(run_id))
        host = self.host(run.base_model)
        adapter = host.served.adapters.get(run_id)
        if adapter is None:
            raise NotFoundError(not_loaded_message(run_id))
        return run, host, adapter

    def add_run(self, run: LoadedRun) -> None:
        self.runs[run.run_id] = run

    def free_run(self, run_id: str) -> bool:
        """Drop a run's adapter, gradients and optimizer state. Its samplers' snapshots are copies and stay."""
        run = self.runs.pop(run_id, None)
        if run is None:
            return False
        host = self.hosts.get(run.base_model)
        if host is not None:
            host.served.remove_adapter(run_id)
        return True

    def free_session(self, session_id: str) -> tuple[list[str], list[str]]:
        """Free every run and sampler of a session; returns (run ids, sampler ids) freed."""
        runs = [r.run_id for r in self.runs.values() if r.session_id == session_id]
        samplers = [s.sampler_id for s in self.samplers.values() if s.session_id == session_id]
        for run_id in runs:
            self.free_run(run_id)
        for sampler_id in samplers:
            del self.samplers[sampler_id]
        return runs, samplers

    def sessions_in_memory(self) -> Iterator[tuple[str, str]]:
        """(session id, owner) of everything held in memory, each once."""
        seen = dict.fromkeys(
            [(r.session_id, r.owner) for r in self.runs.values()]
            + [(s.session_id, s.owner) for s in self.samplers.values()]
        )
        yield from seen
