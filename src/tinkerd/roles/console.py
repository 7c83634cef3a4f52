"""The console on a split deployment's api role: its server page lists the processes the ledger knows (their
lease, last heartbeat and the runs each trainer holds), with the memory each live one reports on its health
endpoint; its playground tokenizes with the tokenizers found on this host for the models the workers serve."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from tinkerd.console import ConsoleConfig
from tinkerd.console import views as console_views
from tinkerd.console.memory import process_memory
from tinkerd.domain.errors import TinkerdError
from tinkerd.domain.records import Clock, utc_now
from tinkerd.hub.catalog import has_tokenizer, resolve_model
from tinkerd.store.workers import WorkerInfo, WorkerRegistry

GONE_SHOWN_S = 3600.0  # a process gone longer ago than this is left off (each restart of an api adds an id)
HEALTH_TIMEOUT_S = 1.0  # a worker busy computing still answers its health thread at once; a dead one is skipped
_ROLE_ORDER = {"api": 0, "trainer": 1, "sampler": 2}

Fetch = Callable[[str], Mapping[str, Any] | None]


def fetch_memory(url: str) -> Mapping[str, Any] | None:
    """The ``memory`` a worker's health endpoint reports, or None when it does not answer in time."""
    try:
        answer = httpx.get(url, timeout=HEALTH_TIMEOUT_S)
        memory = answer.json().get("memory") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return memory if isinstance(memory, Mapping) else None


class LedgerRoles:
    """The server page's roles and workers, read from the ledger at each call: the live ones, and those gone
    within the last hour."""

    def __init__(self, registry: WorkerRegistry, self_id: str, fetch: Fetch = fetch_memory, clock: Clock = utc_now):
        self._registry = registry
        self._self_id = self_id
        self._fetch = fetch
        self._clock = clock

    def __call__(self) -> list[dict[str, Any]]:
        now = self._clock()
        shown_since = now - timedelta(seconds=GONE_SHOWN_S)
        infos = [i for i in self._registry.all() if i.heartbeat_at > shown_since]
        live = [i for i in infos if i.stopped_at is None and i.lease_expires_at > now]
        asked = [i for i in live if i.id != self._self_id and i.health_url]
        memories: dict[str, Mapping[str, Any] | None] = {}
        if asked:
            with ThreadPoolExecutor(min(8, len(asked))) as pool:
                answers = pool.map(self._fetch, [i.health_url or "" for i in asked])
                memories = dict(zip([i.id for i in asked], answers, strict=True))
        memories[self._self_id] = process_memory()

        def order(info: WorkerInfo) -> tuple[bool, int, str]:
            return (info not in live, _ROLE_ORDER.get(info.role, 9), info.id)

        return [console_views.worker(i, now, memories.get(i.id)) for i in sorted(infos, key=order)]


class LocalTokenizerDirs(Mapping[str, Path]):
    """Tokenizer directories on this host for the models some worker serves: a pulled model id resolves in the
    cache directory, a local path as itself. A model found nowhere here has none (the playground says so)."""

    def __init__(self, models: Mapping[str, object], cache_dir: Path) -> None:
        self._models = models
        self._cache_dir = cache_dir

    def __getitem__(self, name: str) -> Path:
        if name not in self._models:
            raise KeyError(name)
        try:
            path = resolve_model(name, self._cache_dir).path
        except TinkerdError:
            raise KeyError(name) from None
        if not has_tokenizer(path):
            raise KeyError(name)
        return path

    def __iter__(self) -> Iterator[str]:
        return (name for name in list(self._models) if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def console_config(
    registry: WorkerRegistry, self_id: str, models: Mapping[str, object], cache_dir: Path
) -> ConsoleConfig:
    return ConsoleConfig(tokenizer_dirs=LocalTokenizerDirs(models, cache_dir), roles=LedgerRoles(registry, self_id))
