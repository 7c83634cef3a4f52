"""`tinkerd api`: HTTP only (no torch, no engine), and the web console. Requests go to the ledger; trainers and
samplers in other processes take them from there (dispatch ThroughLedger), and the base models served are whatever
live workers registered."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import uvicorn

from tinkerd.api import ApiSettings, ServedModelInfo, ThroughLedger, create_app, load_keys_file
from tinkerd.console import mount_console
from tinkerd.domain.vision import VisionSpec
from tinkerd.roles.console import console_config
from tinkerd.roles.lease import Heartbeat
from tinkerd.roles.settings import RoleSettings, check_storage, open_ledger
from tinkerd.settings import Settings
from tinkerd.store.workers import WorkerRegistry, sorted_base_models

log = logging.getLogger(__name__)

_MODELS_TTL_S = 1.0


class LiveModels(Mapping[str, ServedModelInfo]):
    """The base models some live trainer or sampler serves, re-read from the ledger at most once a second."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self._registry = registry
        self._models: dict[str, ServedModelInfo] = {}
        self._read_at = 0.0
        self._lock = threading.Lock()

    def _current(self) -> dict[str, ServedModelInfo]:
        with self._lock:
            if time.monotonic() - self._read_at > _MODELS_TTL_S:
                facts = sorted_base_models(self._registry.live())
                self._models = {name: _info(f) for name, f in facts.items()}
                self._read_at = time.monotonic()
            return self._models

    def __getitem__(self, name: str) -> ServedModelInfo:
        return self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


def _info(facts: Mapping[str, object]) -> ServedModelInfo:
    values = dict(facts)
    eos = values.get("eos_token_ids") or ()
    values["eos_token_ids"] = tuple(eos) if isinstance(eos, list | tuple) else ()
    vision = values.get("vision")
    values["vision"] = VisionSpec(**vision) if isinstance(vision, dict) else None
    return ServedModelInfo(**values)  # type: ignore[arg-type]  # written by roles.worker from a ServedModelInfo


def run_api(roles: RoleSettings, settings: Settings, announce: Callable[[str], None] = print) -> None:
    """Serve the Tinker API in the foreground until SIGTERM / Ctrl-C."""
    storage = check_storage(roles.storage_dir)
    store = open_ledger(roles.database_url)
    worker_id = roles.id_for("api")
    registry = WorkerRegistry(store.db)
    stop = threading.Event()
    try:
        api = ApiSettings(
            data_dir=storage,
            max_body_bytes=settings.max_body_mb * 1024 * 1024,
            max_queued_per_user=settings.max_queued_per_user,
            max_runs_per_user=settings.max_runs_per_user,
            max_image_pixels=settings.max_image_pixels,
            image_root=settings.resolved_image_root,
            # Results come by NOTIFY; the re-read is only a safety net for a lost event.
            poll_interval_s=5.0,
        )
        if settings.keys_file is not None:
            api = ApiSettings(**{**api.__dict__, "api_keys": load_keys_file(settings.keys_file)})
        models = LiveModels(registry)
        app = create_app(store, models, ThroughLedger(store), api)
        mount_console(app, console_config(registry, worker_id, models, settings.cache_dir))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((roles.host, roles.port or 8000))
        url = f"http://{roles.host}:{sock.getsockname()[1]}"

        def register() -> bool:
            registry.register(
                worker_id=worker_id, role="api", host=socket.gethostname(), pid=os.getpid(), base_models={},
                lease_s=roles.lease_s, health_url=f"{url}/api/v1/healthz",
            )  # fmt: skip
            return True  # an api holds nothing a lease guards: after a long silence it simply registers again

        register()
        Heartbeat(registry, worker_id, roles, stop, on_lost=register).start()
        announce(f"tinkerd api listening on {url}  (clients: TINKER_BASE_URL={url})")
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            sock.close()
    finally:
        stop.set()
        registry.stop(worker_id)
        store.close()
