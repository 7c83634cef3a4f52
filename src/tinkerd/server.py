"""Composition of a whole tinkerd process: store + engine hosts + worker thread + API, served by uvicorn.

``serve(settings)`` runs it in the foreground (``tinkerd serve``) until Ctrl-C or SIGTERM; ``running(...)`` runs it
in a background thread on a free loopback port and yields the base URL (tests, notebooks, scripts).

Threads: uvicorn's event loop serves HTTP; one worker thread owns torch and the engine. They meet only in the store
(the futures ledger) and two callbacks: the API wakes the idle worker after a submit, and the worker notifies the
API's long-polls when a request finishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from tinkerd import hub
from tinkerd.api import ApiSettings, FutureNotifier, InProcess, ServedModelInfo, create_app, load_keys_file
from tinkerd.console import ConsoleConfig, mount_console
from tinkerd.console import views as console_views
from tinkerd.domain.architectures import preferred_path
from tinkerd.domain.errors import ModelFetchError
from tinkerd.domain.ops import LOGPROB_DISTRIBUTIONS
from tinkerd.domain.records import utc_now
from tinkerd.domain.vision import vision_spec_of
from tinkerd.hub.catalog import has_tokenizer
from tinkerd.hub.layout import is_repo_id
from tinkerd.settings import Settings, SettingsError
from tinkerd.store import Store, default_url

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tinkerd.roles.ranks import Ranks
    from tinkerd.worker.loop import Worker

log = logging.getLogger(__name__)

Announce = Callable[[str], None]
_WORKER_JOIN_S = 30.0  # a job in progress (a long backward) may take a while to end


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def model_info(model: hub.ResolvedModel, engine_path: str | None = None) -> ServedModelInfo:
    """The facts the API needs about a served model, from its config files (no torch).

    ``engine_path`` is the path the loaded engine took; without it, the one the config's model type asks for."""
    config = _read_json(model.path / "config.json")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    facts = text_config or config
    generation = _read_json(model.path / "generation_config.json")
    eos = generation.get("eos_token_id", facts.get("eos_token_id"))
    eos_ids = tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int))
    architectures = config.get("architectures") or [config.get("model_type", "unknown")]
    max_context = facts.get("max_position_embeddings") or facts.get("n_positions") or 2048
    tokenizer_id: str | None = None
    if has_tokenizer(model.path):
        # A repo id lets remote clients fetch the tokenizer from the hub (or the HF_HOME tinkerd prints); a local
        # directory only works on this machine, which is where clients of a loopback server are.
        tokenizer_id = model.name if is_repo_id(model.name) else str(model.path)
    return ServedModelInfo(
        name=model.name,
        tokenizer_id=tokenizer_id,
        arch=str(architectures[0]),
        vocab_size=int(facts["vocab_size"]),
        max_context_length=int(max_context),
        eos_token_ids=eos_ids,
        tokenizer_dir=str(model.path) if (model.path / "tokenizer.json").is_file() else None,
        engine_path=engine_path or preferred_path(config).value,
        vision=vision_spec_of(config, _read_json(model.path / "preprocessor_config.json")),
    )


def resolve_models(settings: Settings, announce: Announce | None = None) -> list[hub.ResolvedModel]:
    """The served models' directories. The embedded default is pulled on first use (about 20 s, once)."""
    names = settings.models or (hub.DEFAULT_MODEL,)
    resolved: list[hub.ResolvedModel] = []
    for name in names:
        try:
            resolved.append(hub.resolve_model(name, settings.cache_dir))
        except ModelFetchError:
            if name not in hub.CATALOG:
                raise
            if announce is not None:
                announce(f"Pulling {name} into {settings.cache_dir} (first start only)...")
            hub.pull(name, settings.cache_dir, progress=announce is not None)
            resolved.append(hub.resolve_model(name, settings.cache_dir))
    return resolved


@dataclass
class Components:
    """Everything a running tinkerd holds, built by ``build`` and torn down by ``close``."""

    settings: Settings
    store: Store
    notifier: FutureNotifier
    models: list[hub.ResolvedModel]
    app: FastAPI
    worker: Worker
    stop: threading.Event
    thread: threading.Thread | None = None
    ranks: Ranks | None = None  # the other ranks of a trainer spanning several (--ranks, torchrun)
    on_close: list[Callable[[], None]] = dataclasses.field(default_factory=list)  # e.g. stop the vLLM engines

    def start_worker(self) -> None:
        # Before anything is served: the requests a previous run left running are failed before the api records
        # new ones as claimed by this worker.
        self.worker.start()
        self.thread = threading.Thread(target=self.worker.run_forever, args=(self.stop,), name="tinkerd-worker")
        self.thread.daemon = True  # a stuck engine call must not keep the process alive after shutdown
        self.thread.start()

    def close(self) -> None:
        self.notifier.close()
        self.stop.set()
        self.worker.wake()
        if self.thread is not None:
            self.thread.join(_WORKER_JOIN_S)
            if self.thread.is_alive():
                log.warning("the worker did not stop within %.0f s; exiting anyway", _WORKER_JOIN_S)
        for close in self.on_close:
            close()
        self.store.close()
        if self.ranks is not None:
            self.ranks.close()


def build(
    settings: Settings, *, announce: Announce | None = None, api_settings: ApiSettings | None = None
) -> Components:
    """Open the store, load the models onto the engine, and build the worker and the app (nothing runs yet)."""
    # torch loads here, not at import: `tinkerd --help` and the API module stay light.
    from tinkerd.roles.ranks import check_sharding, engine_config, handshake, start_ranks
    from tinkerd.sampler_backends import start_samplers
    from tinkerd.worker.hosts import ModelHost
    from tinkerd.worker.loop import Worker

    check_sharding(settings)
    data_dir = settings.resolved_data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    models = resolve_models(settings, announce)
    keys = load_keys_file(settings.keys_file) if settings.keys_file is not None else None
    store = Store.open(default_url(data_dir))
    ranks = None
    try:
        ranks = start_ranks(settings, announce)  # None for one rank: no collectives on that path
        engine = engine_config(settings, ranks.device if ranks is not None else settings.device)
        if settings.sampler == "vllm":  # vLLM samples: no second copy of the weights for the builtin sampler
            engine = dataclasses.replace(engine, sample_dtype=engine.train_dtype)
        hosts: dict[str, ModelHost] = {}
        if announce is not None:
            announce(f"Engine on {engine.device}, {engine.train_dtype_note()}")
        for model in models:
            if announce is not None:
                announce(f"Loading {model.name} from {model.path}")
            if ranks is None:
                hosts[model.name] = ModelHost.from_directory(model.name, model.path, engine)
            else:
                hosts[model.name] = ModelHost.from_directory(model.name, model.path, engine, ranks.make_served)
        if ranks is not None:
            handshake(ranks.channel, {name: host.served for name, host in hosts.items()})
        vllm_backends = start_samplers(settings, models, hosts, data_dir / "vllm", announce)
        notifier = FutureNotifier()
        worker = Worker(
            store,
            hosts,
            data_dir,
            notify=notifier.notify,
            await_answer=notifier.await_answer,
            watching=notifier.watching,
            on_progress=notifier.progress,
        )
        api = dataclasses.replace(
            api_settings or ApiSettings(),
            data_dir=data_dir,
            max_body_bytes=settings.max_body_mb * 1024 * 1024,
            max_queued_per_user=settings.max_queued_per_user,
            max_runs_per_user=settings.max_runs_per_user,
            max_image_pixels=settings.max_image_pixels,
            image_root=settings.resolved_image_root,
            sample_logprobs=next(d for d in LOGPROB_DISTRIBUTIONS if d == settings.sample_logprobs),
        )
        if keys is not None:
            api = dataclasses.replace(api, api_keys=keys)
        dispatch = InProcess(notifier, worker.accept, claim_for=worker.config.worker_id)
        infos = [model_info(m, hosts[m.name].engine_path.value) for m in models]
        app = create_app(store, infos, dispatch, api)
        mount_console(app, _console_config(models, worker, ranks.info.world_size if ranks is not None else 1))
    except BaseException:
        for backend in locals().get("vllm_backends", []):
            backend.close()
        store.close()
        if ranks is not None:
            ranks.close()
        raise
    closers = [backend.close for backend in vllm_backends]
    return Components(settings, store, notifier, models, app, worker, threading.Event(), ranks=ranks, on_close=closers)


def _console_config(models: Sequence[hub.ResolvedModel], worker: Worker, world_size: int = 1) -> ConsoleConfig:
    names = [m.name for m in models]
    detail = "trainer and sampler" + (f" (trainer on {world_size} ranks)" if world_size > 1 else "")
    started = utc_now()

    def roles() -> list[dict[str, Any]]:
        # One process plays every role here: the api, and one worker thread owning the engine and all models.
        return [
            console_views.in_process("api", f"pid {os.getpid()}", "Tinker API and console", names, started),
            console_views.in_process("worker", worker.config.worker_id, detail, names, started),
        ]

    return ConsoleConfig(tokenizer_dirs={m.name: m.path for m in models if has_tokenizer(m.path)}, roles=roles)


class _Uvicorn(uvicorn.Server):
    """Releases held long-polls as soon as shutdown starts, so Ctrl-C does not wait out a 25 s poll."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)


def _uvicorn_config(app: FastAPI, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        # The SDK keeps connections in a pool between calls; let them live across its polling gaps.
        timeout_keep_alive=30,
    )


class _Terminated(Exception):
    """SIGTERM, turned into an exception so that shutdown runs the same cleanup as Ctrl-C."""


def _raise_terminated(_sig: int, _frame: FrameType | None) -> None:
    raise _Terminated


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket (port 0: any free port), so that a taken port is an error before anything starts."""
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP, and without
    # it every response written in two parts (headers, body) waits ~40 ms for the client's delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise SettingsError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def serve(settings: Settings, announce: Announce = print) -> None:
    """Run tinkerd in the foreground until Ctrl-C or SIGTERM, then stop the worker and close the store.

    Rank r > 0 of a trainer spanning several ranks (``--ranks``, torchrun) follows rank 0 instead (roles/ranks.py).
    Raises RanksLostError (after stopping) when a rank of the trainer was lost.
    """
    from tinkerd.roles.ranks import RanksLostError, is_follower, run_follower

    if is_follower():
        run_follower(settings, announce)
        return
    sock = listen_socket(settings.host, settings.port)
    try:
        components = build(settings, announce=announce)
    except BaseException:
        sock.close()
        raise
    server = _Uvicorn(_uvicorn_config(components.app, settings.host, settings.port), components.notifier.close)
    url = f"http://{settings.host}:{sock.getsockname()[1]}"
    announce(f"tinkerd listening on {url}  (clients: TINKER_BASE_URL={url} TINKER_API_KEY=tml-<anything>)")
    for model in components.models:
        announce(f"  serving {model.name}  ({model.path})")
    if any(m.name in hub.CATALOG for m in components.models):
        announce(f"  tokenizers for clients, offline: HF_HOME={hub.hf_home(settings.cache_dir)} HF_HUB_OFFLINE=1")
    announce(f"  console: {url}/console/")
    announce(f"  data in {settings.resolved_data_dir}")
    announce("  auth: " + (f"keys from {settings.keys_file}" if settings.keys_file else "single user, any key"))
    # uvicorn restores the previous handlers and re-raises the signal after its graceful shutdown; SIGTERM's default
    # would kill the process before the worker stops, so turn it into an exception and clean up below. (A SystemExit
    # from uvicorn itself, a failed startup, still propagates with its exit code.)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    if components.ranks is not None:
        components.ranks.on_lost(lambda: setattr(server, "should_exit", True))
    components.start_worker()
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        announce("tinkerd: stopping")
        components.close()
        sock.close()
        signal.signal(signal.SIGTERM, previous)
    lost = components.ranks.channel.lost if components.ranks is not None else None
    if lost is not None:
        raise RanksLostError(lost)


@contextmanager
def running(
    model: str | Sequence[str] | None = None,
    data_dir: Path | str | None = None,
    *,
    api_settings: ApiSettings | None = None,
    startup_timeout_s: float = 60.0,
    **settings: Any,
) -> Iterator[str]:
    """Run a whole tinkerd in this process on a free 127.0.0.1 port; yields the base URL for the SDK.

    `model`: served model names or local HF directories (default: the embedded model). `data_dir`: where the
    database and checkpoints go (default: a temporary directory, removed afterwards). Other keyword arguments are
    Settings fields (cache_dir, device, dtype, keys_file).
    """
    import tempfile

    models = [model] if isinstance(model, str) else list(model or [])
    with tempfile.TemporaryDirectory(prefix="tinkerd-") as scratch:
        base = Settings.load(
            models=models,
            data_dir=Path(data_dir) if data_dir is not None else Path(scratch),
            host="127.0.0.1",
            **settings,
        )
        components = build(base, api_settings=api_settings)
        sock = listen_socket(base.host, 0)
        port = sock.getsockname()[1]
        server = _Uvicorn(_uvicorn_config(components.app, base.host, port), components.notifier.close)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tinkerd-http", daemon=True)
        try:
            components.start_worker()
            thread.start()
            deadline = time.monotonic() + startup_timeout_s
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("tinkerd's HTTP server did not start")
                time.sleep(0.01)
            yield f"http://{base.host}:{port}"
        finally:
            components.notifier.close()
            server.should_exit = True
            if thread.is_alive():
                thread.join(10)
            sock.close()
            components.close()
