"""Forward and forward_backward requests of many runs on one base model, run as one ``ServedModel.forward`` call.

When requests share a pass, each is validated on its own first, so a bad one (unknown loss, token outside the
vocabulary, a run that is not loaded) fails alone and its neighbours run; a request alone skips that step, since its
pass fails only itself. Should the shared pass itself raise, every involved adapter's gradients are put back as they
were and the requests are retried one by one, so a request that breaks the engine fails alone too, and a failed
request never leaves half a gradient behind.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ForwardResult
from tinkerd.domain.records import FutureRecord
from tinkerd.domain.requests import ForwardBackward
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.worker.hosts import ModelHost
from tinkerd.worker.runtime import Runtime

log = logging.getLogger(__name__)

Outcome = ForwardResult | Exception


@dataclass(frozen=True)
class ForwardItem:
    future: FutureRecord
    request: ForwardBackward


@dataclass(frozen=True)
class _Prepared:
    item: ForwardItem
    host: ModelHost
    job: ForwardJob


def run_forward_batch(runtime: Runtime, items: Sequence[ForwardItem]) -> list[tuple[ForwardItem, Outcome]]:
    """Every item's result or exception, in the order given."""
    outcomes: dict[str, Outcome] = {}
    by_host: dict[str, list[_Prepared]] = {}
    for item in items:
        try:
            p = _prepare(runtime, item)
        except Exception as exc:
            outcomes[item.future.request_id] = exc
        else:
            by_host.setdefault(p.host.name, []).append(p)
    for group in by_host.values():
        served = group[0].host.served
        if len(group) > 1:  # alone, a bad request fails only itself anyway: no need to check it apart first
            group = _validated(group, outcomes)
        if not group:
            continue
        for p, outcome in zip(group, _run_group(served, [p.job for p in group]), strict=True):
            outcomes[p.item.future.request_id] = _check_finite(served, p.job, outcome)
    return [(item, outcomes[item.future.request_id]) for item in items]


def _prepare(runtime: Runtime, item: ForwardItem) -> _Prepared:
    req = item.request
    run, host, _ = runtime.training(req.run_id, item.future.owner)
    job = ForwardJob(
        run.run_id, req.datums, req.loss_fn, dict(req.loss_fn_config), backward=req.backward, top_k=req.top_k_logprobs
    )
    return _Prepared(item, host, job)


def _validated(group: list[_Prepared], outcomes: dict[str, Outcome]) -> list[_Prepared]:
    """The requests of a shared pass that pass ``ServedModel.validate``; the others' errors go to ``outcomes``."""
    valid: list[_Prepared] = []
    for p in group:
        try:
            p.host.served.validate(p.job)
        except Exception as exc:
            outcomes[p.item.future.request_id] = exc
        else:
            valid.append(p)
    return valid


def _run_group(served: ServedModel, jobs: list[ForwardJob]) -> list[Outcome]:
    try:
        with _restore_grads_on_error(served, jobs):
            return list(served.forward(jobs))
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
        log.warning("a batched forward of %d requests failed (%r); retrying them one by one", len(jobs), exc)
    outcomes: list[Outcome] = []
    for job in jobs:
        try:
            with _restore_grads_on_error(served, [job]):
                outcomes.append(served.forward([job])[0])
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


@contextmanager
def _restore_grads_on_error(served: ServedModel, jobs: Iterable[ForwardJob]) -> Iterator[None]:
    """Remember the ``.grad`` of every adapter a backward job touches; put them back if the block raises."""
    ids = {job.adapter_id for job in jobs if job.backward and job.adapter_id is not None}
    params = [p for adapter_id in sorted(ids) for p in served.adapter(adapter_id).weights.parameters()]
    # Usually the first forward_backward after an optim_step: no gradient yet, nothing to copy.
    saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
    try:
        yield
    except BaseException:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
        raise


def _check_finite(served: ServedModel, job: ForwardJob, outcome: Outcome) -> Outcome:
    """NaN or infinity in a result has no JSON spelling, and means training has diverged: fail the request with
    a message saying so, and drop the run's poisoned gradients so the next optim_step is a clean no-op."""
    if isinstance(outcome, Exception):
        return outcome
    bad = _first_non_finite(outcome)
    if bad is None:
        return outcome
    what = "forward_backward" if job.backward else "forward"
    message = f"{what} produced a non-finite value ({bad}); the model has likely diverged"
    if job.backward and job.adapter_id is not None:
        served.discard_grads(job.adapter_id)  # on every rank of a distributed trainer
        message += (
            ": the gradients accumulated since the last optim_step were discarded, so the next optim_step leaves "
            "the weights unchanged. Lower the learning rate, or check the loss inputs"
        )
    return InvalidRequestError(message)


def _first_non_finite(result: ForwardResult) -> str | None:
    for name, value in result.metrics.items():
        if not math.isfinite(value):
            return f"metric {name} = {value}"
    for i, outputs in enumerate(result.loss_fn_outputs):
        for name, array in outputs.items():
            if not all(math.isfinite(v) for v in array.values):
                return f"loss_fn_outputs[{i}][{name!r}]"
    return None
