"""The vLLM sampler backend: the builtin ``Sampler``'s surface (submit, step, cancel, progress) over a vLLM server.

Each submitted request runs on a thread of its own (a blocking ``/v1/completions`` call; vLLM batches concurrent
requests continuously, the whole decode batch of one engine). ``step`` waits a moment for requests to finish and
hands them back on the caller's thread, so the worker loop drives this backend exactly as it drives the builtin one,
and training jobs keep running between steps while vLLM decodes in its own process.

Sampler versions are LoRA adapters (``adapters.AdapterRegistry``): the version a request resolved to at submit is the
one it samples from, whatever is saved later. Faults: a request that cannot reach the engine (it died, or is
restarting) waits for the engine to serve again and is sent once more; a second failure fails the request with a
message saying so. Logprobs: with the trainer at hand (``scorer``), finished requests are scored once more by the
training forward, exactly as the builtin sampler does (``engine/rescoring.py``), so both backends report the same
numbers for the same tokens.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import SampleResult, SamplingParams
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.rescoring import RescoreItem, rescore
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampling_validation import MAX_NUM_SAMPLES, validate_job
from tinkerd.engine.transformer import ModelShape, Transformer
from tinkerd.engine.vllm.adapters import AdapterRegistry
from tinkerd.engine.vllm.completions import parse_response, refuse_unsupported, request_body
from tinkerd.engine.vllm.engine import VllmEngine
from tinkerd.engine.vllm.http import EngineRefused, EngineUnreachable, call, healthy

log = logging.getLogger(__name__)

STEP_WAIT_S = 0.02  # how long ``step`` waits for a request to finish when none has
READY_WAIT_S = 300.0  # how long a request waits for a restarting engine before it fails
REQUEST_TIMEOUT_S = 3600.0


class VllmBackend:
    """What the samplers of one base model share: the supervised engine, its adapters, a pool of request threads."""

    def __init__(self, engine: VllmEngine, base_model: str, max_threads: int = 256) -> None:
        self.engine = engine
        self.adapters = AdapterRegistry(
            engine.config.work_dir / "adapters", base_model, engine.config.max_adapters, lambda: engine.base_url
        )
        self.pool = cf.ThreadPoolExecutor(max_threads, thread_name_prefix="tinkerd-vllm")
        self._seen_generation = 0
        self._generation_lock = threading.Lock()

    def warm_up(self, weights: LoraWeights) -> None:
        """One token through an adapter: vLLM's first LoRA request after a start takes seconds, so a user's should not.
        The adapter (a throwaway one, e.g. zero-initialised) is unloaded again afterwards."""
        job = SampleJob(
            prompt=[0], params=SamplingParams(max_tokens=1, temperature=0.0), num_samples=1, weights=weights
        )
        self.complete(job)
        version = self.adapters.acquire(weights)
        self.adapters.release(version)
        self.adapters.drop(version)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.stop()

    def ready_generation(self) -> int:
        generation = self.engine.wait_ready(READY_WAIT_S)
        with self._generation_lock:
            if generation != self._seen_generation:
                if self._seen_generation:
                    self.adapters.forget_engine()  # a restarted engine holds no adapters
                self._seen_generation = generation
        return generation

    def complete(self, job: SampleJob) -> SampleResult:
        """Run one request on the engine (blocking), retried once after the engine failed under it."""
        version = self.adapters.acquire(job.weights) if job.weights is not None else None
        try:
            for attempt in (1, 2):
                generation = self.engine.generation
                try:
                    generation = self.ready_generation()
                    model = self.engine.config.served_name
                    if version is not None:
                        self.adapters.ensure_loaded(version, self.engine.base_url, generation)
                        model = version.name
                    response = call(
                        self.engine.base_url, "POST", "/v1/completions", request_body(job, model), REQUEST_TIMEOUT_S
                    )
                    return parse_response(job, response)
                except EngineUnreachable as exc:
                    if attempt == 2:
                        raise RuntimeError(
                            f"the vLLM engine failed while sampling this request, and again after it was retried "
                            f"once: {exc}"
                        ) from None
                    log.warning("a sampling request lost the vLLM engine (%s); retrying it once", exc)
                    self._wait_recovered(generation)
                except EngineRefused as exc:
                    if exc.status == 404 and version is not None and attempt == 1:
                        version.loaded_in = 0  # the engine forgot the adapter (restarted between our checks)
                        continue
                    if exc.status >= 500 and attempt == 1 and not self._engine_healthy():
                        # the engine is failing, not the request: retry once it is back
                        log.warning("vLLM failed under a sampling request (%s); retrying it once", exc)
                        self._wait_recovered(generation)
                        continue
                    if 400 <= exc.status < 500:
                        raise InvalidRequestError(f"vLLM refused the request: {exc}") from None
                    raise RuntimeError(f"vLLM failed on this request ({exc.status}): {exc}") from None
            raise AssertionError("unreachable")
        finally:
            if version is not None:
                self.adapters.release(version)

    def _wait_recovered(self, generation: int) -> None:
        try:
            self.engine.wait_recovered(generation, READY_WAIT_S)
        except EngineUnreachable as exc:
            raise RuntimeError(
                f"the vLLM engine failed while sampling this request and did not come back: {exc}"
            ) from None

    def _engine_healthy(self) -> bool:
        try:
            return healthy(self.engine.base_url, timeout=5.0)
        except EngineUnreachable:  # not running at all
            return False


@dataclass(eq=False)
class _Pending:
    job: SampleJob
    future: cf.Future[SampleResult]


class VllmSampler:
    """The per-model sampler the worker drives; a fresh one (after a failed step) shares the backend."""

    def __init__(
        self,
        backend: VllmBackend,
        shape: ModelShape,
        decode_text: Callable[[list[int]], str] | None = None,
        scorer: Transformer | None = None,
        max_num_samples: int = MAX_NUM_SAMPLES,
    ) -> None:
        self.backend = backend
        self.shape = shape
        self.decode_text = decode_text
        self.scorer = scorer
        self.max_num_samples = max_num_samples
        self._tickets = itertools.count()
        self._pending: dict[int, _Pending] = {}

    def submit(self, job: SampleJob) -> int:
        validate_job(job, self.shape, self.max_num_samples, self.decode_text is not None)
        config = self.backend.engine.config
        refuse_unsupported(
            job, max_logprobs=config.max_logprobs, max_lora_rank=config.max_lora_rank, rescored=self.scorer is not None
        )
        ticket = next(self._tickets)
        self._pending[ticket] = _Pending(job, self.backend.pool.submit(self.backend.complete, job))
        return ticket

    def has_work(self) -> bool:
        return bool(self._pending)

    def run(self, jobs: Sequence[SampleJob]) -> list[SampleResult]:
        """Submit ``jobs`` and step until all finish; results in their order (the first failure is raised).

        As ``Sampler.run``: for a sampler with nothing else in flight."""
        if self.has_work():
            raise RuntimeError("VllmSampler.run needs an idle sampler; drive submit() and step() yourself instead")
        tickets = [self.submit(job) for job in jobs]
        results: dict[int, SampleResult | Exception] = {}
        while self.has_work():
            results.update(self.step())
        out: list[SampleResult] = []
        for ticket in tickets:
            outcome = results[ticket]
            if isinstance(outcome, Exception):
                raise outcome
            out.append(outcome)
        return out

    def cancel(self, ticket: int) -> bool:
        """Forget a request; vLLM finishes it unseen (a blocking completion cannot be recalled)."""
        pending = self._pending.pop(ticket, None)
        if pending is not None:
            pending.future.cancel()
        return pending is not None

    def progress(self, ticket: int) -> list[tuple[list[int], list[float]]] | None:
        """No tokens before a request finishes (requests are not streamed from vLLM); None once it has."""
        pending = self._pending.get(ticket)
        if pending is None:
            return None
        return [([], []) for _ in range(pending.job.num_samples)]

    def step(self) -> list[tuple[int, SampleResult | Exception]]:
        """The requests that finished, waiting up to STEP_WAIT_S for one. A failed request comes back as its
        exception, so one request's failure never fails another's."""
        if not self._pending:
            return []
        cf.wait([p.future for p in self._pending.values()], STEP_WAIT_S, return_when=cf.FIRST_COMPLETED)
        done: list[tuple[int, SampleResult | Exception]] = []
        finished: list[tuple[int, SampleJob, SampleResult]] = []
        for ticket, pending in list(self._pending.items()):
            if not pending.future.done():
                continue
            del self._pending[ticket]
            error = pending.future.exception()
            if error is not None:
                done.append((ticket, error if isinstance(error, Exception) else RuntimeError(str(error))))
            else:
                finished.append((ticket, pending.job, pending.future.result()))
        if finished and self.scorer is not None:
            items = [RescoreItem(job.prompt, job.weights, job.params, result) for _, job, result in finished]
            rescored = rescore(self.scorer, items)
            finished = [(t, job, r) for (t, job, _), r in zip(finished, rescored, strict=True)]
        return done + [(ticket, result) for ticket, _, result in finished]
