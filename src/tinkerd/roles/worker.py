"""`tinkerd trainer` and `tinkerd sampler`: the engine and a worker loop in a process of their own.

A trainer claims only the requests of the runs placed on it; a sampler only sampling requests of the base models it
serves. Both register in the ledger, keep their lease with heartbeats (and reap workers whose lease ran out:
roles.lease), wake
on the ledger's NOTIFY of new requests rather than polling it, and answer GET /healthz.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Literal

from tinkerd.roles.health import HealthServer
from tinkerd.roles.lease import Heartbeat
from tinkerd.roles.settings import RoleSettings, check_storage, open_ledger
from tinkerd.roles.wake_filter import TrainerEvents
from tinkerd.server import model_info, resolve_models
from tinkerd.settings import Settings, SettingsError
from tinkerd.store import events
from tinkerd.store.events import Callbacks, LedgerListener
from tinkerd.store.sequencing import ClaimScope
from tinkerd.store.workers import WorkerRegistry

log = logging.getLogger(__name__)

Role = Literal["trainer", "sampler"]
# Without an event (a lost NOTIFY), the ledger is still read this often: a safety net, not the wake-up path.
_SAFETY_POLL_S = 5.0


def run_worker(role: Role, roles: RoleSettings, settings: Settings, announce: Callable[[str], None] = print) -> None:
    """Run one trainer or sampler in the foreground until SIGTERM / Ctrl-C (or its lease is lost)."""
    from tinkerd.roles.ranks import (
        RanksLostError,
        check_sharding,
        engine_config,
        handshake,
        is_follower,
        run_follower,
        start_ranks,
    )
    from tinkerd.sampler_backends import start_samplers
    from tinkerd.worker.hosts import ModelHost
    from tinkerd.worker.loop import Worker, WorkerConfig

    if role == "trainer" and is_follower():  # rank r > 0 of a trainer spanning several ranks (torchrun, --ranks)
        run_follower(settings, announce)
        return
    if role == "sampler" and settings.ranks > 1:
        raise SettingsError("a sampler runs on one rank; --ranks is for trainers")
    check_sharding(settings, role)
    storage = check_storage(roles.storage_dir)
    store = open_ledger(roles.database_url)
    worker_id = roles.id_for(role)
    stop = threading.Event()
    ranks = None
    closers: list[Callable[[], None]] = []  # the vLLM engines a sampler started
    try:
        models = resolve_models(settings, announce)
        ranks = start_ranks(settings, announce) if role == "trainer" else None
        engine = engine_config(settings, ranks.device if ranks is not None else settings.device)
        if role == "sampler" and settings.sampler == "vllm":  # no second copy of the weights for the builtin sampler
            engine = dataclasses.replace(engine, sample_dtype=engine.train_dtype)
        if role == "trainer":  # it never samples: a sharded base then stays a shard, with no whole copy beside it
            engine = dataclasses.replace(engine, sampling=False)
        announce(f"{role} {worker_id}: engine on {engine.device}, {engine.train_dtype_note()}")
        hosts = {}
        for model in models:
            announce(f"{role} {worker_id}: loading {model.name} from {model.path}")
            try:
                if ranks is None:
                    hosts[model.name] = ModelHost.from_directory(model.name, model.path, engine)
                else:
                    hosts[model.name] = ModelHost.from_directory(model.name, model.path, engine, ranks.make_served)
            except Exception as exc:
                raise SettingsError(f"cannot load base model {model.name} from {model.path}: {exc}") from exc
        if ranks is not None:
            handshake(ranks.channel, {name: host.served for name, host in hosts.items()})
        if role == "sampler":
            backends = start_samplers(settings, models, hosts, storage / "vllm" / worker_id, announce)
            closers += [backend.close for backend in backends]
        scope = ClaimScope(trainer_id=worker_id) if role == "trainer" else ClaimScope(sample_base_models=tuple(hosts))
        config = WorkerConfig(
            worker_id=worker_id, poll_interval_s=_SAFETY_POLL_S, scope=scope, share_snapshots=role == "trainer"
        )
        worker = Worker(store, hosts, storage, config=config)
        registry = WorkerRegistry(store.db)

        def report() -> dict[str, Any]:
            runs = registry.runs_of(worker_id) if role == "trainer" else []
            world = ranks.info.world_size if ranks is not None else 1
            return {
                "status": "ok",
                "role": role,
                "id": worker_id,
                "models": sorted(hosts),
                "runs": runs,
                "ranks": world,
            }

        health = HealthServer(roles.host, roles.port, report)
        health.start()
        facts = {m.name: dataclasses.asdict(model_info(m)) for m in models}
        registry.register(
            worker_id=worker_id, role=role, host=socket.gethostname(), pid=os.getpid(), base_models=facts,
            lease_s=roles.lease_s, capacity=roles.capacity if role == "trainer" else 0, health_url=health.url,
        )  # fmt: skip
        # A trainer skips sampling work and other trainers' runs; a sampler skips training work.
        concerns = (
            TrainerEvents(registry, worker_id).concerns
            if role == "trainer"
            else lambda work: events.concerns(work, events.SAMPLE)
        )

        def submitted(work: str) -> None:
            if concerns(work):
                worker.wake()

        listener = LedgerListener(store.db.url, Callbacks(on_submitted=submitted, on_reconnect=worker.wake))
        listener.start()

        def lost() -> bool:
            # Its runs have been failed and may be resumed elsewhere: running on would be two owners of one run.
            log.error("worker %s lost its lease (it was silent past %.0f s); stopping", worker_id, roles.lease_s)
            _stop(stop, worker.wake)
            return False

        Heartbeat(registry, worker_id, roles, stop, on_lost=lost).start()
        announce(f"{role} {worker_id} serving {', '.join(hosts)}; health at {health.url}")
        previous = signal.signal(signal.SIGTERM, lambda _s, _f: _stop(stop, worker.wake))
        if ranks is not None:
            ranks.on_lost(lambda: _stop(stop, worker.wake))
        try:
            worker.start()
            worker.run_forever(stop)
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            signal.signal(signal.SIGTERM, previous)
            registry.stop(worker_id)
            listener.close()
            health.close()
            announce(f"{role} {worker_id}: stopped")
    finally:
        for close in closers:
            close()
        store.close()
        if ranks is not None:
            ranks.close()
    if ranks is not None and ranks.channel.lost is not None:
        raise RanksLostError(ranks.channel.lost)


def _stop(stop: threading.Event, wake: Callable[[], None], _frame: FrameType | None = None) -> None:
    stop.set()
    wake()
