"""A stand-in for the worker: claims futures from the real ledger and completes them with deterministic results.

Results are simple functions of the request (logprob -i for token i, etc.), so tests can assert exactly what the
API delivers. Saving weights records a checkpoint row, like the real worker, so loads and REST views can follow.
A loss_fn of "fail_user" / "fail_server" fails the request with that category. ``pause()`` holds all work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from tinkerd.domain import codec
from tinkerd.domain.ops import ArrayData, ForwardResult, OptimStepResult, SampledSequence, SampleResult
from tinkerd.domain.paths import TinkerPath
from tinkerd.domain.records import Checkpoint, FutureRecord, utc_now
from tinkerd.domain.requests import (
    AdapterState,
    CreateModel,
    CreateModelResult,
    Empty,
    ForwardBackward,
    LoadWeights,
    OptimStep,
    PathResult,
    Request,
    ResetAdapter,
    Result,
    Sample,
    SamplerResult,
    SaveWeights,
    SnapshotForSampler,
)
from tinkerd.store import Store


class FailRequest(Exception):
    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


def fake_result(store: Store, future: FutureRecord, request: Request) -> Result:
    match request:
        case CreateModel():
            return CreateModelResult(model_id=request.run_id)
        case ForwardBackward():
            if request.loss_fn.startswith("fail_"):
                raise FailRequest(f"loss {request.loss_fn} failed", request.loss_fn.removeprefix("fail_"))
            outputs = [{"logprobs": ArrayData.of_floats([-float(t) for t in datum.tokens])} for datum in request.datums]
            tokens = sum(len(datum.tokens) for datum in request.datums)
            return ForwardResult(loss_fn_outputs=outputs, metrics={"loss:sum": float(tokens)})
        case OptimStep():
            return OptimStepResult(metrics={"learning_rate:mean": request.adam.learning_rate})
        case SaveWeights():
            path = TinkerPath(request.run_id, request.kind, request.name)
            checkpoint = Checkpoint(
                request.run_id, request.kind, request.name, future.owner, utc_now(), 1234,
                user_metadata=dict(request.user_metadata),
            )  # fmt: skip
            store.checkpoints.add(checkpoint, overwrite=request.overwrite)
            return PathResult(path=str(path), model_id=request.run_id, size_bytes=1234, step=future.seq_id)
        case SnapshotForSampler():
            return SamplerResult(sampling_session_id=request.sampler_id)
        case LoadWeights():
            return PathResult(path=request.path, model_id=request.run_id, step=0)
        case ResetAdapter():
            return AdapterState(step=0, lora_rank=4)
        case Sample():
            sequences = [
                SampledSequence(tokens=[7, 8 + i], logprobs=[-0.5, -0.25], stop_reason="length")
                for i in range(request.num_samples)
            ]
            prompt_logprobs: list[float | None] | None = None
            if request.prompt_logprobs:
                prompt_logprobs = [None] + [-float(t) for t in request.prompt[1:]]
            return SampleResult(sequences=sequences, prompt_logprobs=prompt_logprobs)
        case _:
            return Empty()


class FakeWorker:
    def __init__(self, store: Store, notify: Callable[[str], None]) -> None:
        self.store = store
        self.notify = notify
        self.executed: list[FutureRecord] = []
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._running.set()
        self._wake.set()
        self._thread.join(5)

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._running.wait()
            if self._stop.is_set():
                return
            claim = self.store.futures.claim_ready(worker_id="fake")
            for future in claim.futures:
                self._run(future)
            if not claim.futures:
                self._wake.wait(0.01)
                self._wake.clear()

    def _run(self, future: FutureRecord) -> None:
        request = codec.decode(future.payload or b"")
        self.executed.append(future)
        try:
            result = fake_result(self.store, future, request)
        except FailRequest as error:
            self.store.futures.fail(future.request_id, str(error), "user" if error.category == "user" else "server")
        except Exception as error:  # a user error as the real worker reports one
            self.store.futures.fail(future.request_id, str(error), "user")
        else:
            self.store.futures.complete(future.request_id, codec.encode(result))
        self.notify(future.request_id)
