"""Drive a real Store and Worker the way the api does: rows and encoded requests in, decoded results out."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch

from tests.engine.tiny_models import tiny_model
from tinkerd.domain import codec
from tinkerd.domain.ids import DEFAULT_OWNER, sampler_id, training_run_id
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, ForwardResult, LoraConfig, SampleResult, SamplingParams
from tinkerd.domain.records import FutureRecord, FutureState, RequestKind, Sampler, Session, TrainingRun
from tinkerd.domain.requests import (
    CreateModel,
    ForwardBackward,
    LoadWeights,
    OptimStep,
    Request,
    Sample,
    SaveWeights,
    SnapshotForSampler,
)
from tinkerd.engine.config import EngineConfig
from tinkerd.store import Store
from tinkerd.worker.hosts import DecodeText, ModelHost
from tinkerd.worker.loop import Worker, WorkerConfig

BASE = "tiny-llama"
VOCAB = 96
# One thread: tiny matmuls gain nothing from two, and OpenMP spin-waits are slow on a shared, busy CPU.
FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32", num_threads=1)


class FakeClock:
    """A fixed start that moves 1 ms per reading, so rows written in turn sort in that order."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


def make_host(config: EngineConfig = FP32, seed: int = 0, decode_text: DecodeText | None = None) -> ModelHost:
    model = tiny_model("llama", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # weights large enough that distributions are peaked: samples depend on the adapter
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return ModelHost.from_model(BASE, model, config, decode_text)


def datums(seed: int, lengths: tuple[int, ...] = (6, 9, 4)) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out: list[Datum] = []
    for n in lengths:
        tokens = torch.randint(3, VOCAB, (n + 1,), generator=g).tolist()
        out.append(
            Datum(
                tokens[:-1],
                {"target_tokens": ArrayData.of_ints(tokens[1:]), "weights": ArrayData.of_floats([1.0] * n)},
            )
        )
    return out


class RequestFailed(Exception):
    def __init__(self, message: str, category: str) -> None:
        super().__init__(f"[{category}] {message}")
        self.message = message
        self.category = category


@dataclass
class Api:
    """What the api layer does: create rows, submit encoded requests, read results."""

    store: Store
    clock: FakeClock
    session_id: str = "sess"
    owner: str = DEFAULT_OWNER
    seqs: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        now = self.clock()
        self.store.sessions.create(Session(self.session_id, self.owner, now, now))

    def submit(self, kind: RequestKind, model_id: str, request: Request, seq_id: int | None = None) -> str:
        if seq_id is None and kind.sequenced:
            seq_id = self.seqs.get(model_id, 1)
            self.seqs[model_id] = seq_id + 1
        record = self.store.futures.submit(
            owner=self.owner, model_id=model_id, seq_id=seq_id, kind=kind, payload=codec.encode(request)
        )
        return record.request_id

    def create_model(self, n: int = 0, rank: int = 4, seed: int = 0) -> str:
        run_id = training_run_id(self.session_id, n)
        now = self.clock()
        lora = LoraConfig(rank=rank, seed=seed)
        self.store.runs.create(TrainingRun(run_id, self.session_id, self.owner, BASE, now, now, lora))
        self.submit(RequestKind.CREATE_MODEL, run_id, CreateModel(run_id, BASE, lora), seq_id=0)
        return run_id

    def create_from_state(self, n: int, path: str, with_optimizer: bool = True) -> tuple[str, str]:
        """(run id, request id) of create_training_client_from_state[_with_optimizer]."""
        run_id = training_run_id(self.session_id, n)
        now = self.clock()
        self.store.runs.create(TrainingRun(run_id, self.session_id, self.owner, BASE, now, now))
        request = LoadWeights(run_id, path, with_optimizer, create_base_model=BASE, create=True)
        return run_id, self.submit(RequestKind.LOAD_WEIGHTS, run_id, request, seq_id=0)

    def forward_backward(
        self, run_id: str, data: list[Datum], loss_fn: str = "cross_entropy", seq_id: int | None = None
    ) -> str:
        return self.submit(RequestKind.FORWARD_BACKWARD, run_id, ForwardBackward(run_id, data, loss_fn), seq_id)

    def forward(self, run_id: str, data: list[Datum], seq_id: int | None = None) -> str:
        request = ForwardBackward(run_id, data, "cross_entropy", backward=False)
        return self.submit(RequestKind.FORWARD, run_id, request, seq_id)

    def optim_step(self, run_id: str, lr: float = 0.05, seq_id: int | None = None) -> str:
        return self.submit(RequestKind.OPTIM_STEP, run_id, OptimStep(run_id, AdamParams(learning_rate=lr)), seq_id)

    def save(self, run_id: str, name: str, kind: str = "weights", **kwargs: object) -> str:
        request = SaveWeights(run_id, kind, name, **kwargs)  # type: ignore[arg-type]
        kind_ = RequestKind.SAVE_WEIGHTS if kind == "weights" else RequestKind.SAVE_WEIGHTS_FOR_SAMPLER
        return self.submit(kind_, run_id, request)

    def snapshot(self, run_id: str, n: int) -> tuple[str, str]:
        sid = sampler_id(self.session_id, n)
        return self.submit(RequestKind.SAVE_WEIGHTS_FOR_SAMPLER, run_id, SnapshotForSampler(run_id, sid)), sid

    def sampler_for_path(self, n: int, path: str | None) -> str:
        sid = sampler_id(self.session_id, n)
        self.store.samplers.create(Sampler(sid, self.session_id, self.owner, BASE, self.clock(), model_path=path))
        return sid

    def sample(self, sid: str, prompt: list[int], num_samples: int = 2, seed: int | None = 7, **params: object) -> str:
        sampling = SamplingParams(**{"max_tokens": 6, "seed": seed, **params})  # type: ignore[arg-type]
        request = Sample(sid, prompt, num_samples, sampling)
        seq = self.seqs.get(sid, 0)
        self.seqs[sid] = seq + 1
        return self.submit(RequestKind.SAMPLE, sid, request, seq_id=seq)

    def record(self, request_id: str) -> FutureRecord:
        return self.store.futures.get(request_id, self.owner)

    def result(self, request_id: str) -> object:
        record = self.record(request_id)
        if record.state is FutureState.FAILED:
            raise RequestFailed(record.error_message or "", record.error_category or "")
        assert record.state is FutureState.COMPLETED, f"{request_id} is {record.state}"
        assert record.result is not None
        return codec.decode(record.result)

    def loss(self, request_id: str) -> float:
        result = self.result(request_id)
        assert isinstance(result, ForwardResult)
        return result.metrics["loss:sum"]

    def sampled(self, request_id: str) -> SampleResult:
        result = self.result(request_id)
        assert isinstance(result, SampleResult)
        return result


def make_worker(
    store: Store, host: ModelHost, data_dir: Path, clock: FakeClock, notified: list[str] | None = None, **config: object
) -> Worker:
    return Worker(
        store,
        {host.name: host},
        data_dir,
        None if notified is None else lambda request_id, _finished: notified.append(request_id),
        config=WorkerConfig(**config),  # type: ignore[arg-type]
        clock=clock,
    )


def drain(worker: Worker, limit: int = 500) -> int:
    """Run the worker until it has nothing to do; returns the iterations taken."""
    for i in range(limit):
        if not worker.run_once():
            return i
    raise AssertionError("the worker never went idle")
