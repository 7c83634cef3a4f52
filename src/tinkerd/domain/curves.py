"""A run's step metrics as a table: the columns, one dict per row, CSV. Shared by the HTTP endpoint and the CLI.

Columns: ``id`` (poll with ``after=id``), ``step`` (optim steps before the row), ``kind``, ``seq_id``,
``recorded_at``, ``loss_per_token`` (``loss:sum`` over the batch's summed loss weights, forward_backward rows), then
every metric name any row carries, sorted. A row lacking a metric leaves its cell empty.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from tinkerd.domain.records import StepMetrics

FIXED_COLUMNS = ("id", "step", "kind", "seq_id", "recorded_at", "loss_per_token")

Cell = str | int | float | None


def loss_per_token(row: StepMetrics) -> float | None:
    loss = row.metrics.get("loss:sum")
    if loss is None or not row.loss_weight:
        return None
    return loss / row.loss_weight


def metric_names(rows: Sequence[StepMetrics]) -> list[str]:
    return sorted({name for row in rows for name in row.metrics})


def as_dict(row: StepMetrics) -> dict[str, Cell]:
    """One row as a flat JSON object: the fixed columns, then its metrics under their own names."""
    return {
        "id": row.id,
        "step": row.step,
        "kind": row.kind.value,
        "seq_id": row.seq_id,
        "recorded_at": row.recorded_at.isoformat(),
        "loss_per_token": loss_per_token(row),
        **row.metrics,
    }


def to_csv(rows: Sequence[StepMetrics]) -> str:
    columns = [*FIXED_COLUMNS, *metric_names(rows)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in as_dict(row).items()})
    return out.getvalue()
