"""Every role's heartbeat: keep this process's lease in the ledger, and reap the workers whose lease ran out.

A lease is judged by other processes, so a process reaps only while it has itself been able to heartbeat on time
for a whole lease: after the database was unreachable (PostgreSQL restarting), every lease in it looks expired,
and reaping at once would fail the runs of trainers that are alive and merely could not write either. Waiting one
lease after its own recovery gives each of them a heartbeat's chance to show it is alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tinkerd.roles.settings import RoleSettings
from tinkerd.store.workers import WorkerRegistry

log = logging.getLogger(__name__)


class Heartbeat:
    """A daemon thread: heartbeat every `roles.heartbeat_s`; reap when steady (see the module docstring).

    `on_lost` runs when the ledger says this process's lease was taken (it was reaped while silent)."""

    def __init__(
        self,
        registry: WorkerRegistry,
        worker_id: str,
        roles: RoleSettings,
        stop: threading.Event,
        on_lost: Callable[[], bool],
    ) -> None:
        self._registry = registry
        self._worker_id = worker_id
        self._roles = roles
        self._stop = stop
        self._on_lost = on_lost
        self._thread = threading.Thread(target=self._run, name="tinkerd-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        roles = self._roles
        steady_since = time.monotonic()
        last_ok = steady_since
        while not self._stop.wait(roles.heartbeat_s):
            try:
                alive = self._registry.heartbeat(self._worker_id, roles.lease_s)
            except Exception as exc:  # the database restarting: the lease has some slack
                log.warning("heartbeat of %s failed (%s); retrying", self._worker_id, exc)
                steady_since = time.monotonic()
                continue
            now = time.monotonic()
            if now - last_ok > roles.lease_s / 2:  # a heartbeat that waited for the database counts as a gap
                steady_since = now
            last_ok = now
            if not alive and not self._on_lost():
                return
            if now - steady_since >= roles.lease_s:
                self._reap()

    def _reap(self) -> None:
        try:
            reaped = self._registry.reap(sample_grace_s=self._roles.lease_s)
        except Exception as exc:
            log.warning("reaping expired workers failed (%s); retrying at the next heartbeat", exc)
            return
        for trainer, runs in reaped.lost_runs.items():
            log.warning("trainer %s lost its lease; its runs %s failed (resume them from a save)", trainer, runs)
        if reaped.retried_samples:
            log.warning("requeued %d sampling requests of lost samplers", len(reaped.retried_samples))
        if reaped.failed_samples:
            log.warning("failed %d sampling requests no live sampler can take", len(reaped.failed_samples))
