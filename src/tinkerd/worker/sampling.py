"""Sampling requests on the continuous-batching samplers: resolve what a sampler samples, submit, step, collect.

A request joins its base model's running decode batch as soon as it is claimed; each ``step`` advances every
host's batch by one token and hands back the requests that finished. Sampler weights come from an in-memory
snapshot (save_weights_and_get_sampling_client), a ``tinker://`` checkpoint read from disk on first use (then
cached), or nothing (the base model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.ops import SampleResult
from tinkerd.domain.paths import TinkerPath, parse_tinker_path
from tinkerd.domain.records import FutureRecord
from tinkerd.domain.requests import Sample, SampleProgress
from tinkerd.engine.checkpoint import check_compatible, load_checkpoint
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.vllm import VllmSampler
from tinkerd.store.storage import CheckpointStorage
from tinkerd.store.store import Store
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.runtime import Runtime, SamplerSource

log = logging.getLogger(__name__)

# How often the ledger is asked whether requests in flight were finished elsewhere (a client cancelled them).
CANCEL_CHECK_INTERVAL_S = 0.25

SampleOutcome = SampleResult | Exception
# Streaming: whether someone in this process watches a request's tokens as they come, and where they go.
Watching = Callable[[str], bool]
OnProgress = Callable[[str, list[SampleProgress]], None]


@dataclass
class _InFlight:
    future: FutureRecord
    num_samples: int
    sent: list[int] = field(default_factory=list)  # per sample: tokens already reported as progress


class SamplingService:
    def __init__(
        self,
        store: Store,
        runtime: Runtime,
        files: CheckpointStorage,
        *,
        watching: Watching | None = None,
        on_progress: OnProgress | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.files = files
        self.watching = watching
        self.on_progress = on_progress
        self._in_flight: dict[str, dict[int, _InFlight]] = {name: {} for name in runtime.hosts}
        self._next_cancel_check = 0.0

    # -- submitting ----------------------------------------------------------------------------------------------

    def submit(self, future: FutureRecord, req: Sample) -> None:
        """Queue a request on its base model's sampler. Raises (a user error, usually) if it cannot be sampled."""
        host, weights = self.resolve(req.sampler_id, future.owner)
        job = SampleJob(
            prompt=list(req.prompt),
            params=req.params,
            num_samples=req.num_samples,
            weights=weights,
            prompt_logprobs=req.prompt_logprobs,
            topk_prompt_logprobs=req.topk_prompt_logprobs,
            topk_sample_logprobs=req.topk_sample_logprobs,
            prompt_logprobs_last_n=req.prompt_logprobs_last_n,
            target_prompt_logprobs=req.target_prompt_logprobs,
            prompt_alt_tokens_k=req.prompt_alt_tokens_k,
            images=tuple(req.images),
        )
        ticket = host.sampler.submit(job)  # validates against the model first
        self._in_flight[host.name][ticket] = _InFlight(future, req.num_samples, [0] * req.num_samples)

    def resolve(self, sampler_id: str, owner: str) -> tuple[ModelHost, LoraWeights | None]:
        source = self.runtime.samplers.get(sampler_id)
        if source is None or source.owner != owner:
            source = self._source_from_store(sampler_id, owner)
            self.runtime.samplers[sampler_id] = source
        host = self.runtime.host(source.base_model)
        if source.checkpoint is None:
            return host, source.snapshot
        path = source.checkpoint
        # Read the row each time: a deleted (or expired) checkpoint must stop serving, an overwritten one re-read.
        row = self.store.checkpoints.get(path, owner)
        return host, self.runtime.weights_cache.get(path, row.created_at, lambda: self._load(host, path))

    def _source_from_store(self, sampler_id: str, owner: str) -> SamplerSource:
        record = self.store.samplers.get(sampler_id, owner)
        if record.run_id is not None:
            shared = self.files.snapshot_read_dir(sampler_id)
            if shared is not None:  # a trainer in another process wrote it (split deployment)
                host = self.runtime.host(record.base_model)
                loaded = load_checkpoint(shared, host.sample_transformer.device, load_optimizer=False)
                w = loaded.weights
                snapshot = LoraWeights(w.rank, w.alpha, w.a, w.b, frozen=True)
                return SamplerSource(sampler_id, owner, record.session_id, record.base_model, snapshot=snapshot)
            raise NotFoundError(
                f"sampler {sampler_id!r} sampled an in-memory snapshot of training run {record.run_id!r}, which "
                "this server no longer holds (it restarted, or the session ended); save the weights with "
                "save_weights_for_sampler(name) and create a sampling client from the returned tinker:// path"
            )
        checkpoint = parse_tinker_path(record.model_path) if record.model_path else None
        return SamplerSource(sampler_id, owner, record.session_id, record.base_model, checkpoint)

    def _load(self, host: ModelHost, path: TinkerPath) -> LoraWeights:
        loaded = load_checkpoint(self.files.read_dir(path), host.sample_transformer.device, load_optimizer=False)
        check_compatible(loaded.weights, host.sample_transformer.hf)
        if loaded.base_model and loaded.base_model != host.name:
            raise InvalidRequestError(
                f"checkpoint {path} was trained on {loaded.base_model!r}, not on the sampler's base model {host.name!r}"
            )
        w = loaded.weights
        # frozen: a sampler version never changes, so the sampler may keep its dtype casts of these tensors
        return LoraWeights(w.rank, w.alpha, w.a, w.b, frozen=True)

    # -- stepping ------------------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return any(host.sampler.has_work() for host in self.runtime.hosts.values())

    def decodes_elsewhere(self) -> bool:
        """Whether every sampler with work decodes in another process (vLLM): stepping only collects results."""
        busy = [host.sampler for host in self.runtime.hosts.values() if host.sampler.has_work()]
        return bool(busy) and all(isinstance(sampler, VllmSampler) for sampler in busy)

    def in_flight_count(self) -> int:
        return sum(len(tickets) for tickets in self._in_flight.values())

    def step(self) -> list[tuple[FutureRecord, SampleOutcome]]:
        """One decode step on every host with work; the requests that finished (or failed) in it."""
        finished: list[tuple[FutureRecord, SampleOutcome]] = []
        for name, host in self.runtime.hosts.items():
            if not host.sampler.has_work():
                continue
            tickets = self._in_flight[name]
            try:
                done = host.sampler.step()
            except Exception as exc:
                # Requests were validated on submit, so this is ours; the sampler's state is unknown now: start a
                # fresh one and fail what it held (the SDK raises; the user may retry).
                log.exception("the sampler of %s failed; failing its %d requests", name, len(tickets))
                host.reset_sampler()
                finished += [(flight.future, exc) for flight in tickets.values()]
                tickets.clear()
                continue
            for ticket, result in done:
                flight = tickets.pop(ticket)
                outcome: SampleOutcome = result
                if isinstance(result, Exception):  # the vLLM backend fails one request without the others
                    pass
                elif len(result.sequences) != flight.num_samples:
                    outcome = RuntimeError(f"sampler returned {len(result.sequences)} of {flight.num_samples} samples")
                finished.append((flight.future, outcome))
            self._report_progress(host, tickets)
        return finished

    def _report_progress(self, host: ModelHost, tickets: dict[int, _InFlight]) -> None:
        """The new tokens of every watched request still decoding (a finished one is notified whole)."""
        if self.watching is None or self.on_progress is None:
            return
        for ticket, flight in tickets.items():
            request_id = flight.future.request_id
            if not self.watching(request_id):
                continue
            samples = host.sampler.progress(ticket)
            if samples is None:
                continue
            report: list[SampleProgress] = []
            for i, (tokens, logprobs) in enumerate(samples):
                sent = flight.sent[i]
                if len(tokens) > sent:
                    report.append(SampleProgress(i, tokens[sent:], logprobs[sent:]))
                    flight.sent[i] = len(tokens)
            if report:
                try:
                    self.on_progress(request_id, report)
                except Exception:
                    log.exception("reporting the progress of %s failed", request_id)

    def drop_cancelled(self, *, force: bool = False) -> list[FutureRecord]:
        """Stop generating requests the ledger already holds as finished (a client cancelled them, e.g. by closing
        its stream), freeing their sequences' slots; returns their futures. Reads the ledger at most every
        ``CANCEL_CHECK_INTERVAL_S`` unless `force`."""
        now = time.monotonic()
        if not force and now < self._next_cancel_check:
            return []
        self._next_cancel_check = now + CANCEL_CHECK_INTERVAL_S
        ids = [flight.future.request_id for tickets in self._in_flight.values() for flight in tickets.values()]
        if not ids:
            return []
        gone = self.store.futures.finished_among(ids)
        dropped: list[FutureRecord] = []
        for name, tickets in self._in_flight.items():
            for ticket, flight in list(tickets.items()):
                if flight.future.request_id in gone:
                    self.runtime.hosts[name].sampler.cancel(ticket)
                    del tickets[ticket]
                    dropped.append(flight.future)
        if dropped:
            log.info("stopped %d sampling requests finished elsewhere (cancelled by their clients)", len(dropped))
        return dropped

    def abandon_all(self) -> list[FutureRecord]:
        """Drop every queued and running request (shutting down); returns their futures, to put back or fail."""
        futures = [flight.future for tickets in self._in_flight.values() for flight in tickets.values()]
        for name, host in self.runtime.hosts.items():
            host.reset_sampler()
            self._in_flight[name].clear()
        return futures
