"""Waking retrieve_future long-polls when the worker finishes a request.

The worker runs on its own thread and calls ``notify(request_id)`` after it completes or fails a future; the
long-poll waits on an asyncio event in the server's event loop. ``notify`` only schedules the wake-up on that loop
(``call_soon_threadsafe``), so the worker never blocks on, or touches, asyncio state.

A notification can arrive before the waiter exists (the worker may finish between the poll's read of the ledger
and its wait). Waiters therefore register *before* they read the ledger, and re-read it after every wake-up or
poll interval: a lost notification costs at most one poll interval, never a missed result.

Expected results. The api notes each request it hands to a worker (``expect``: in this process, or through the
ledger, whose FINISHED event reaches this process's listener) until that worker's notification, so that a poll
arriving before the result skips its first ledger read: the request is known to be unfinished. Through the ledger
the notification can beat the ``expect`` (a fast worker); it is then remembered as early, and the request is not
expected. A lost event (the listener reconnecting) forgets every expectation. A request the ledger finishes by
itself without an event (failed at shutdown, say) is found at the next read, one poll interval later.

Answer first. A worker that notifies a request a poll is waiting for may then ``await_answer`` it: hold its next
step (typically its ledger write) until that poll has sent the answer, or a short timeout. Both run on the same
interpreter lock, so the answer goes out sooner when the worker steps aside for it.

Hand-off. A worker in this process passes the finished record (and its result as an object) with the notification;
the notifier keeps the latest ones, so the long-poll answers from memory: no ledger read, no decoding, and no
wait for the worker's own ledger write, which it makes right after notifying. The ledger stays the truth: a
poll that finds nothing here reads it, exactly as for a worker in another process.

Progress. A streamed request (the OpenAI API's ``stream``) is ``watched``: a worker in this process reports its new
tokens after each decode step (``progress``), and they land in the watcher's queue. A worker in another process
reports nothing; the stream then gets the whole answer when it finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator

from tinkerd.domain.requests import Finished, SampleProgress

# Finished requests kept for the hand-off. A client fetches its result within milliseconds of the notification;
# later polls (retries, slow clients) read the ledger.
RECENT_LIMIT = 1024
RECENT_BYTES_LIMIT = 64 * 1024 * 1024
# Requests handed to the worker and not notified yet that are remembered (the oldest are forgotten past this).
EXPECTED_LIMIT = 65536
# Requests notified while not expected, remembered so that a late ``expect`` knows it is too late (see ``expect``).
EARLY_LIMIT = 4096


class FutureNotifier:
    """Thread-safe ``notify``; everything else runs on the event loop it is bound to."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._closed = False
        self._lock = threading.Lock()  # guards _loop and _recent, which notify() touches from other threads
        self._recent: OrderedDict[str, Finished] = OrderedDict()
        self._recent_bytes = 0
        self._expected: dict[str, None] = {}  # an insertion-ordered set, guarded by _lock
        self._early: dict[str, None] = {}  # notified before any expect, guarded by _lock
        self._answering: dict[str, threading.Event] = {}  # notified requests a poll was waiting for, guarded by _lock
        # Streamed requests' progress queues, by request id: written on the loop, read (membership) by the worker.
        self._watched: dict[str, asyncio.Queue[list[SampleProgress]]] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop that serves requests (called at app startup)."""
        with self._lock:
            self._loop = loop
            self._closed = False

    def notify(self, request_id: str, finished: Finished | None = None) -> None:
        """A request finished: wake whoever waits for it. Safe from any thread; never blocks.

        With `finished`, waiters may answer from it (see ``finished``) instead of reading the ledger."""
        with self._lock:
            loop = self._loop
            if request_id in self._expected:
                del self._expected[request_id]
            else:
                self._early[request_id] = None
                if len(self._early) > EARLY_LIMIT:
                    del self._early[next(iter(self._early))]
            if finished is not None:
                self._remember(request_id, finished)
            if request_id in self._waiters:  # read across threads: a dict lookup is atomic
                # Registered before the wake is scheduled, so that ``answered`` (after the wake) always finds it.
                self._answering.setdefault(request_id, threading.Event())
                while len(self._answering) > RECENT_LIMIT:  # never awaited, never answered (a poll gone)
                    del self._answering[next(iter(self._answering))]
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(self._wake, request_id)

    def wake_all(self) -> None:
        """Wake every waiter to read the ledger again (events may have been lost, e.g. a reconnect). Thread-safe."""
        with self._lock:
            loop = self._loop
            self._expected.clear()  # their notifications may be among the lost: polls read the ledger first
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake_everyone)

    def close(self) -> None:
        """Shutting down: wake every waiter so long-polls answer at once instead of holding the exit. Thread-safe."""
        with self._lock:
            loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._close_on_loop)

    def await_answer(self, request_id: str, timeout_s: float) -> bool:
        """After ``notify``: wait until a poll that was waiting for `request_id` has sent its answer (True), or
        `timeout_s` has passed (False). Returns False at once when no poll was waiting. Call from the notifying
        thread."""
        with self._lock:
            answering = self._answering.get(request_id)
        if answering is None:
            return False
        try:
            return answering.wait(timeout_s)
        finally:
            with self._lock:
                self._answering.pop(request_id, None)

    def answered(self, request_id: str) -> None:
        """A poll has sent the answer for `request_id` (releases ``await_answer``). Thread-safe."""
        with self._lock:
            answering = self._answering.pop(request_id, None)
        if answering is not None:
            answering.set()

    def expect(self, request_id: str) -> None:
        """`request_id` was handed to a worker, in this process or through the ledger, whose ``notify`` will follow.
        Thread-safe. Through the ledger the notification may come first (the worker finished before the submitting
        thread got here): then it is remembered as early and the request is not expected."""
        with self._lock:
            if request_id in self._early:
                del self._early[request_id]
                return
            self._expected[request_id] = None
            if len(self._expected) > EXPECTED_LIMIT:
                del self._expected[next(iter(self._expected))]

    def expected(self, request_id: str) -> bool:
        """Whether `request_id` is running in this process, its notification still to come."""
        with self._lock:
            return request_id in self._expected

    def finished(self, request_id: str, owner: str) -> Finished | None:
        """The hand-off for `request_id` if the worker gave one and `owner` owns the request."""
        with self._lock:
            found = self._recent.get(request_id)
        return found if found is not None and found.record.owner == owner else None

    def _remember(self, request_id: str, finished: Finished) -> None:
        old = self._recent.pop(request_id, None)
        if old is not None:
            self._recent_bytes -= len(old.record.result or b"")
        self._recent[request_id] = finished
        self._recent_bytes += len(finished.record.result or b"")
        while self._recent and (len(self._recent) > RECENT_LIMIT or self._recent_bytes > RECENT_BYTES_LIMIT):
            _, evicted = self._recent.popitem(last=False)
            self._recent_bytes -= len(evicted.record.result or b"")

    def watching(self, request_id: str) -> bool:
        """Whether a stream in this process wants `request_id`'s tokens as they come. Safe from any thread."""
        return request_id in self._watched  # a dict lookup is atomic

    def progress(self, request_id: str, report: list[SampleProgress]) -> None:
        """New tokens of a watched request: queued for its stream. Safe from any thread; never blocks."""
        with self._lock:
            loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._push, request_id, report)

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[asyncio.Queue[list[SampleProgress]]]:
        """A queue of `request_id`'s progress reports, while the block runs. Use on the event loop only."""
        queue: asyncio.Queue[list[SampleProgress]] = asyncio.Queue()
        self._watched[request_id] = queue
        try:
            yield queue
        finally:
            if self._watched.get(request_id) is queue:
                del self._watched[request_id]

    def _push(self, request_id: str, report: list[SampleProgress]) -> None:
        queue = self._watched.get(request_id)
        if queue is not None:
            queue.put_nowait(report)

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def waiter(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when `request_id` is notified (or the notifier closes). Use on the event loop only."""
        event = asyncio.Event()
        if self._closed:
            event.set()
        self._waiters.setdefault(request_id, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiters.get(request_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[request_id]

    def _wake(self, request_id: str) -> None:
        for event in self._waiters.get(request_id, ()):
            event.set()

    def _wake_everyone(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    def _close_on_loop(self) -> None:
        self._closed = True
        for events in self._waiters.values():
            for event in events:
                event.set()
