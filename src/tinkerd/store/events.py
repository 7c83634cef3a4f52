"""Ledger events across processes: PostgreSQL NOTIFY when a request is submitted or finishes, and a listener.

The ledger sends the events inside the transaction that makes the change, so PostgreSQL delivers them only once it
is committed: a listener woken by one always finds the change when it reads. On SQLite (one process) nothing is
sent; the process's own dispatch hands results over in memory.

`LedgerListener` keeps one dedicated connection in LISTEN mode on a thread and calls back for each event; it never
polls. When the connection drops (PostgreSQL restarting) it reconnects with backoff and then calls `on_reconnect`,
because events sent while it was away are lost: whoever waits should read the ledger once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.engine import URL

from tinkerd.domain.records import FutureRecord, RequestKind
from tinkerd.store.finished_events import parse_finished

log = logging.getLogger(__name__)

FINISHED = "tinkerd_finished"  # payload: the request id, and the record if it fits (store.finished_events)
# payload: "train:<model id>" (a run's work, for its trainer), "sample:<sampler id>" (for samplers), or "" (anyone)
SUBMITTED = "tinkerd_submitted"
TRAIN = "train"
SAMPLE = "sample"
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")


def send(conn: Connection, channel: str, payload: str) -> None:
    """Queue an event, delivered when `conn`'s transaction commits (PostgreSQL only; a no-op on SQLite)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY, {"channel": channel, "payload": payload})


def send_work(conn: Connection, model_id: str, kind: RequestKind | None = None) -> None:
    """Announce work that may be claimable now: a request of `kind` for `model_id` (without a kind: a run's
    training work, e.g. its next seq_id). Trainers skip sampling work and samplers training work."""
    send(conn, SUBMITTED, f"{SAMPLE if kind is RequestKind.SAMPLE else TRAIN}:{model_id}")


def concerns(payload: str, role: str) -> bool:
    """Whether a SUBMITTED event may concern a worker of `role` (TRAIN or SAMPLE); unknown payloads do."""
    work, colon, _ = payload.partition(":")
    return not colon or work not in (TRAIN, SAMPLE) or work == role


@dataclass(frozen=True)
class Callbacks:
    """Called on the listener's thread; each must be quick and thread-safe."""

    # the request id, and its finished record when the event carried it (store.finished_events)
    on_finished: Callable[[str, FutureRecord | None], None] | None = None
    on_submitted: Callable[[str], None] | None = None
    on_reconnect: Callable[[], None] | None = None


def _conninfo(url: URL) -> str:
    """A libpq connection string from a SQLAlchemy URL (the driver part dropped)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class LedgerListener:
    """LISTEN on the ledger's channels on a daemon thread until `close`."""

    def __init__(self, url: URL, callbacks: Callbacks, *, name: str = "tinkerd-listen") -> None:
        self._conninfo = _conninfo(url)
        self._callbacks = callbacks
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._connection: object | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start listening; returns once the first LISTEN is in place (events from then on are not missed)."""
        self._thread.start()
        if not self._connected.wait(timeout_s):
            raise RuntimeError(f"could not LISTEN on the ledger database within {timeout_s:.0f} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _channels(self) -> list[str]:
        channels = []
        if self._callbacks.on_finished is not None:
            channels.append(FINISHED)
        if self._callbacks.on_submitted is not None:
            channels.append(SUBMITTED)
        return channels

    def _run(self) -> None:
        import psycopg

        delay = 0.05
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    for channel in self._channels():
                        conn.execute(f"LISTEN {channel}")  # type: ignore[arg-type]  # our constants
                    self._connected.set()
                    if not first:
                        log.warning("ledger listener reconnected")
                        if self._callbacks.on_reconnect is not None:
                            self._callbacks.on_reconnect()
                    first = False
                    delay = 0.05
                    while not self._stop.is_set():
                        # Blocks in the socket until an event or the timeout (which only checks for close).
                        for event in conn.notifies(timeout=0.5):
                            self._dispatch(event.channel, event.payload)
            except Exception as exc:  # psycopg.OperationalError and friends: the server went away
                if self._stop.is_set():
                    return
                log.warning("ledger listener lost its connection (%s); reconnecting in %.2fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 2.0)

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            if channel == FINISHED and self._callbacks.on_finished is not None:
                self._callbacks.on_finished(*parse_finished(payload))
            elif channel == SUBMITTED and self._callbacks.on_submitted is not None:
                self._callbacks.on_submitted(payload)
        except Exception:
            log.exception("ledger event callback failed for %s %s", channel, payload)
