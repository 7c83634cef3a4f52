"""What every role is told, and the checks that make a misconfigured process fail at once with a clear message."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import ArgumentError, OperationalError

from tinkerd.settings import SettingsError
from tinkerd.store import Store


@dataclass(frozen=True)
class RoleSettings:
    database_url: str  # the shared ledger: postgresql://user@host:port/db (sqlite:/// works on one host)
    storage_dir: Path  # checkpoint storage shared by every role (a shared directory; an S3-compatible store later)
    host: str = "127.0.0.1"
    port: int = 0  # the api's HTTP port, or a worker's health endpoint (0: any free port)
    worker_id: str | None = None  # stable across restarts to fail what an earlier incarnation left running
    lease_s: float = 10.0  # a worker silent this long loses its lease (a trainer: its runs)
    heartbeat_s: float = 2.0
    capacity: int = 0  # trainers: most runs held at once (0: no limit)

    def id_for(self, role: str) -> str:
        return self.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def open_ledger(url: str) -> Store:
    """The shared store, or a SettingsError naming the URL and the problem (bad URL, unreachable, refused)."""
    try:
        store = Store.open(url, create_schema=False)
        # One attempt first: a wrong or unreachable database is named at once, not after the ledger's reconnect
        # retries (which are for a database that was there and is restarting).
        with store.db.engine.connect():
            pass
        store.db.create_schema()
        return store
    except ArgumentError as exc:
        raise SettingsError(f"bad database URL {url!r}: {exc}") from None
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise SettingsError(f"cannot open the database at {_redacted(url)}: {reason}") from None
    except ModuleNotFoundError as exc:
        raise SettingsError(f"database URL {_redacted(url)} needs a driver that is not installed: {exc}") from None


def check_storage(path: Path) -> Path:
    """The checkpoint storage directory, made if missing; a SettingsError when it cannot be written."""
    path = path.expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tinkerd-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingsError(f"checkpoint storage {path} is not usable: {exc.strerror or exc}") from None
    return path


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"
