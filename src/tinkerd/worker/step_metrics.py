"""What a finished training request leaves behind for curves: its metrics, as a ``StepMetrics`` row."""

from __future__ import annotations

import math
from datetime import datetime

from tinkerd.domain.ops import ForwardResult, OptimStepResult
from tinkerd.domain.records import FutureRecord, StepMetrics
from tinkerd.domain.requests import ForwardBackward, OptimStep, Request, Result


def step_metrics_of(
    future: FutureRecord, request: Request | None, result: Result | None, now: datetime
) -> StepMetrics | None:
    """The metrics to record for a completed forward_backward (with backward) or optim_step; None for anything else.

    Any protocol and any role that completes such a request through the worker gets them recorded, since the
    worker passes them to ``FuturesLedger.complete``.
    """
    if isinstance(request, ForwardBackward) and request.backward and isinstance(result, ForwardResult):
        weight = 0.0
        for datum in request.datums:
            weights = datum.loss_fn_inputs.get("weights")
            weight += float(sum(weights.values)) if weights is not None else float(len(datum.tokens))
        metrics, loss_weight = result.metrics, weight
    elif isinstance(request, OptimStep) and isinstance(result, OptimStepResult):
        metrics, loss_weight = result.metrics, None
    else:
        return None
    return StepMetrics(
        run_id=future.model_id,
        owner=future.owner,
        kind=future.kind,
        seq_id=future.seq_id,
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(v)},
        loss_weight=loss_weight,
        recorded_at=now,
    )
