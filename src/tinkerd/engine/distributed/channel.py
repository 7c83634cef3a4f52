"""The collectives one trainer's ranks exchange, with what a dead rank turns into: a ``RankLostError``.

Rank 0 sends each command with ``scatter_object_list`` (each rank receives its own object: the same command, or
its share of a batch); results come back with ``gather_object``; gradients are summed with ``all_reduce``. One lock
orders rank 0's exchanges, since a keep-alive thread pings idle followers (a follower waits for its next command
inside a collective, which would time out after the group's timeout with nothing to do).

A collective that fails (a rank died: gloo sees its connection close; or a rank went silent past the timeout)
breaks the channel for good: this and every later call raise ``RankLostError``, and ``on_lost`` is told once, so the
process can stop. Replicas that may have diverged must not train on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from tinkerd.engine.distributed.commands import Command, Ping, Shutdown
from tinkerd.engine.distributed.group import RankInfo, leave_group

log = logging.getLogger(__name__)

T = TypeVar("T")


class RankLostError(RuntimeError):
    """A rank of this trainer died or stopped answering; the trainer cannot go on."""


class Channel:
    def __init__(self, info: RankInfo, device: torch.device, timeout_s: float) -> None:
        self.info = info
        self.device = device
        self.timeout_s = timeout_s
        self.on_lost: Callable[[str], None] | None = None  # set by the composition root: stop the process
        self._lock = threading.RLock()
        self._lost: str | None = None
        self._last_exchange = time.monotonic()
        self._stop = threading.Event()
        self._keepalive: threading.Thread | None = None

    @property
    def world_size(self) -> int:
        return self.info.world_size

    @property
    def lost(self) -> str | None:
        """Why the channel broke, or None while every rank answers."""
        return self._lost

    # -- rank 0 ------------------------------------------------------------------------------------------------------

    @contextmanager
    def exchange(self) -> Iterator[None]:
        """Hold the channel for one command and its collectives (rank 0)."""
        with self._lock:
            self._check()
            try:
                yield
            finally:
                self._last_exchange = time.monotonic()

    def send(self, per_rank: Sequence[Command | None]) -> None:
        """Rank 0: ``per_rank[r]`` to rank r (entry 0 is rank 0's own and is not sent anywhere)."""
        assert len(per_rank) == self.world_size
        objects: list[Any] = [None, *per_rank[1:]]
        self._collective(lambda: dist.scatter_object_list([None], objects, src=0))

    def send_all(self, command: Command) -> None:
        self.send([None] + [command] * (self.world_size - 1))

    @property
    def ready(self) -> bool:
        """Whether every rank has loaded its models and waits for commands (rank 0 started its keep-alive)."""
        return self._keepalive is not None

    def start_keepalive(self, interval_s: float) -> None:
        """Rank 0, once every rank waits for commands: ping the followers whenever no command went out for
        ``interval_s`` (well under the timeout)."""
        self._keepalive = threading.Thread(
            target=self._ping_loop, args=(interval_s,), name="tinkerd-ranks-keepalive", daemon=True
        )
        self._keepalive.start()

    def close(self) -> None:
        """Rank 0: tell the followers to exit (unless they are gone, or never got ready), then leave the group."""
        self._stop.set()
        if self._keepalive is not None:
            self._keepalive.join(self.timeout_s)
        if not self.ready:
            return  # the followers are not reading commands yet: a Shutdown would meet another collective
        with self._lock:
            if self._lost is None and self.info.is_leader:
                with suppress(RankLostError):
                    self.send_all(Shutdown())
            if self._lost is None:
                leave_group()  # a group with a dead rank may not tear down cleanly: the process exits anyway

    def _ping_loop(self, interval_s: float) -> None:
        while not self._stop.wait(min(interval_s, 1.0)):
            if self._lost is not None:
                return
            if time.monotonic() - self._last_exchange < interval_s:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # a command is being exchanged: the followers are busy, not idle
            try:
                if self._lost is None and not self._stop.is_set():
                    self.send_all(Ping())
                    self._last_exchange = time.monotonic()
            except RankLostError:
                return
            finally:
                self._lock.release()

    # -- every rank ----------------------------------------------------------------------------------------------------

    def receive(self) -> Command:
        """A follower: the next command from rank 0 (blocks; RankLostError if rank 0 is gone)."""
        out: list[Any] = [None]
        self._collective(lambda: dist.scatter_object_list(out, None, src=0))
        return out[0]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return bool(t.item() > 0)

    def gather(self, value: T) -> list[T] | None:
        """Every rank's ``value`` in rank order on rank 0; None elsewhere."""
        out: list[Any] | None = [None] * self.world_size if self.info.is_leader else None
        self._collective(lambda: dist.gather_object(value, out, dst=0))
        return out

    def all_gather(self, value: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(out, value))
        return out

    def max_(self, values: Sequence[int]) -> list[int]:
        """Each position's largest value over the ranks (the same list on every rank)."""
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return [int(v) for v in t.tolist()]

    def abandon(self, why: str) -> RankLostError:
        """Break the channel on purpose: this rank cannot keep its collectives in step with the others (a sharded
        pass failed half way). Returns the error to raise; the others then see this rank go."""
        self._break(RuntimeError(why))
        return RankLostError(self._lost)

    def sum_(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place; every rank ends with the same bits."""
        self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))

    def _collective(self, call: Callable[[], object]) -> None:
        self._check()
        try:
            call()
        except Exception as exc:  # gloo raises RuntimeError subclasses (DistBackendError, DistNetworkError, ...)
            self._break(exc)
            raise RankLostError(self._lost) from exc

    def _check(self) -> None:
        if self._lost is not None:
            raise RankLostError(self._lost)

    def _break(self, exc: Exception) -> None:
        if self._lost is not None:
            return
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # What a user reads first (error messages may be cut after 200 characters): what happened and what to do.
        self._lost = (
            f"a rank of this {self.world_size}-rank trainer is gone, so the trainer stops; resume its runs from their "
            f"last save_state with create_training_client_from_state_with_optimizer (rank {self.info.rank} saw: "
            f"{detail[:300]})"
        )
        log.error("%s", self._lost)
        if self.on_lost is not None:
            try:
                self.on_lost(self._lost)
            except Exception:
                log.exception("on_lost failed")
