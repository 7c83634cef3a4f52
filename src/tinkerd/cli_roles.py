"""`tinkerd api | trainer | sampler | status`: the split deployment's commands, one role per process.

Each is told the shared database (--database-url, or TINKERD_DATABASE_URL) and the checkpoint storage (--storage, or
TINKERD_STORAGE). Kept apart from cli.py (the one-process commands); `register(app)` adds them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tinkerd.domain.errors import TinkerdError
from tinkerd.settings import Settings, SettingsError

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="The shared ledger, e.g. postgresql://tinkerd@db:5432/tinkerd. Env: TINKERD_DATABASE_URL.",
    ),
]
Storage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Checkpoint storage shared by every role: a directory (or file:// URL) mounted at the same path on "
        "every host. Env: TINKERD_STORAGE.",
    ),
]
Host = Annotated[str, typer.Option("--host", help="Address of the API, or of a worker's health endpoint.")]
Port = Annotated[int, typer.Option("--port", help="Port of the API (default 8000) or health endpoint (0: any free).")]
Models = Annotated[
    list[str] | None, typer.Option("--model", help="Base model to serve (pulled id or local HF directory); repeat.")
]
WorkerId = Annotated[str | None, typer.Option("--worker-id", help="Stable name of this process (default: generated).")]
LeaseS = Annotated[
    float, typer.Option("--lease-s", min=1.0, help="Seconds of silence after which a worker's lease ends.")
]
CacheDir = Annotated[Path | None, typer.Option("--cache-dir", help="Where models are kept.", file_okay=False)]


def _fail(error: Exception) -> typer.Exit:
    message = Text("error: ", style="red")
    message.append(str(error))
    Console(stderr=True).print(message, soft_wrap=True)
    return typer.Exit(code=1)


def _roles(
    database_url: str | None,
    storage: str | None,
    host: str,
    port: int,
    worker_id: str | None,
    lease_s: float,
    capacity: int = 0,
):
    from tinkerd.roles.settings import RoleSettings

    url = database_url or os.environ.get("TINKERD_DATABASE_URL")
    if not url:
        raise SettingsError("no database: pass --database-url or set TINKERD_DATABASE_URL")
    from tinkerd.store.storage import storage_directory

    where = storage or os.environ.get("TINKERD_STORAGE")
    if not where:
        raise SettingsError("no checkpoint storage: pass --storage or set TINKERD_STORAGE")
    return RoleSettings(
        database_url=url, storage_dir=storage_directory(where), host=host, port=port, worker_id=worker_id,
        lease_s=lease_s, heartbeat_s=max(0.2, lease_s / 5), capacity=capacity,
    )  # fmt: skip


def _logging() -> None:
    # Placement, leases and reconnects are logged: an operator of several processes reads them.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def register(app: typer.Typer) -> None:
    @app.command("api")
    def api(
        database_url: DatabaseUrl = None,
        storage: Storage = None,
        host: Host = "127.0.0.1",
        port: Port = 8000,
        keys: Annotated[Path | None, typer.Option("--keys", help="File of '<api-key> <user>' lines.")] = None,
        worker_id: WorkerId = None,
        lease_s: LeaseS = 10.0,
    ) -> None:
        """Run the API role (HTTP only, no torch) of a split deployment."""
        from tinkerd.roles.api import run_api

        _logging()
        try:
            roles = _roles(database_url, storage, host, port, worker_id, lease_s)
            run_api(roles, Settings.load(keys_file=keys), announce=typer.echo)
        except (TinkerdError, SettingsError) as error:
            raise _fail(error) from error

    def worker_command(role: str) -> None:
        def command(
            database_url: DatabaseUrl = None,
            storage: Storage = None,
            model: Models = None,
            host: Host = "127.0.0.1",
            port: Port = 0,
            worker_id: WorkerId = None,
            lease_s: LeaseS = 10.0,
            capacity: Annotated[
                int, typer.Option("--capacity", min=0, help="Trainers: most runs at once (0: no limit).")
            ] = 0,
            device: Annotated[str | None, typer.Option("--device", help="Torch device.")] = None,
            threads: Annotated[int | None, typer.Option("--threads", min=1, help="Torch threads.")] = None,
            cache_dir: CacheDir = None,
            ranks: Annotated[
                int | None,
                typer.Option("--ranks", min=1, help="Trainers: processes (one per device) this trainer spans."),
            ] = None,
            rank_timeout_s: Annotated[
                int | None, typer.Option("--rank-timeout-s", min=1, help="Trainers: collective timeout (s).")
            ] = None,
            base_sharding: Annotated[
                str | None,
                typer.Option(
                    "--base-sharding", help="Trainers on several ranks: replicated or sharded (FSDP2) frozen base."
                ),
            ] = None,
        ) -> None:
            from tinkerd.roles.worker import run_worker

            _logging()
            try:
                roles = _roles(database_url, storage, host, port, worker_id, lease_s, capacity)
                settings = Settings.load(
                    models=model, device=device, threads=threads, cache_dir=cache_dir, ranks=ranks,
                    rank_timeout_s=rank_timeout_s, base_sharding=base_sharding,
                )  # fmt: skip
                run_worker("trainer" if role == "trainer" else "sampler", roles, settings, announce=typer.echo)
            except (TinkerdError, SettingsError) as error:
                raise _fail(error) from error

        command.__doc__ = (
            "Run a trainer of a split deployment: training runs placed on it, on the base models it serves."
            if role == "trainer"
            else "Run a sampler of a split deployment: sampling requests of the base models it serves."
        )
        app.command(role)(command)

    worker_command("trainer")
    worker_command("sampler")

    @app.command("status")
    def status(database_url: DatabaseUrl = None) -> None:
        """List the roles registered in a split deployment's database, their leases and their runs."""
        from tinkerd.roles.settings import open_ledger
        from tinkerd.store.workers import WorkerRegistry

        try:
            url = database_url or os.environ.get("TINKERD_DATABASE_URL")
            if not url:
                raise SettingsError("no database: pass --database-url or set TINKERD_DATABASE_URL")
            store = open_ledger(url)
        except (TinkerdError, SettingsError) as error:
            raise _fail(error) from error
        try:
            registry = WorkerRegistry(store.db)
            live = {w.id for w in registry.live()}
            table = Table("role", "id", "host", "pid", "state", "models", "runs", "health")
            for info in registry.all():
                state = "live" if info.id in live else "gone"
                runs = ", ".join(registry.runs_of(info.id)) if info.role == "trainer" else ""
                table.add_row(
                    info.role, info.id, info.host, str(info.pid), state, ", ".join(info.base_models), runs,
                    info.health_url or "",
                )  # fmt: skip
            Console().print(table)
        finally:
            store.close()
