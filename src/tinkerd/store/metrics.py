"""Step metrics of training runs: written with the completion of each forward_backward and optim_step, read for
curves. ``record`` runs inside the ledger's completing transaction, so a result and its metrics land together."""

from __future__ import annotations

from sqlalchemy import Connection, RowMapping, func, insert, select

from tinkerd.domain.ids import validate_run_id
from tinkerd.domain.records import RequestKind, StepMetrics
from tinkerd.store.db import Database
from tinkerd.store.tables import step_metrics

_INSERT = insert(step_metrics)
# Reading a run's history past this many rows at once is paged by the caller (``after``).
MAX_ROWS = 10_000


def record(conn: Connection, step: StepMetrics) -> None:
    """Insert one request's metrics (call inside the transaction that completes the request)."""
    conn.execute(
        _INSERT,
        {
            "run_id": step.run_id,
            "owner": step.owner,
            "kind": step.kind.value,
            "seq_id": step.seq_id,
            "metrics": step.metrics,
            "loss_weight": step.loss_weight,
            "recorded_at": step.recorded_at,
        },
    )


class MetricsRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def for_run(self, run_id: str, owner: str, *, after: int = 0, limit: int = MAX_ROWS) -> list[StepMetrics]:
        """The run's metrics in the order they were recorded, those with ``id > after``, at most ``limit``.

        Only the run's owner sees them: for anyone else the run has no metrics (no error, nothing revealed).
        """
        validate_run_id(run_id)
        limit = max(1, min(limit, MAX_ROWS))
        optim = RequestKind.OPTIM_STEP.value

        def txn(conn: Connection) -> list[StepMetrics]:
            rows = (
                conn.execute(
                    select(step_metrics)
                    .where(step_metrics.c.run_id == run_id, step_metrics.c.owner == owner, step_metrics.c.id > after)
                    .order_by(step_metrics.c.id)
                    .limit(limit)
                )
                .mappings()
                .all()
            )
            steps_before = conn.execute(
                select(func.count())
                .select_from(step_metrics)
                .where(
                    step_metrics.c.run_id == run_id,
                    step_metrics.c.owner == owner,
                    step_metrics.c.kind == optim,
                    step_metrics.c.id <= after,
                )
            ).scalar_one()
            out: list[StepMetrics] = []
            step = int(steps_before)
            for row in rows:
                out.append(_from_row(row, step))
                if row["kind"] == optim:  # an optim_step closes its step: what follows belongs to the next one
                    step += 1
            return out

        return self._db.read(txn)

    def last_losses(self, run_ids: list[str], owner: str) -> dict[str, StepMetrics]:
        """For each run, its latest forward_backward metrics (for run lists)."""
        if not run_ids:
            return {}

        def txn(conn: Connection) -> dict[str, StepMetrics]:
            latest = (
                select(func.max(step_metrics.c.id))
                .where(
                    step_metrics.c.run_id.in_(run_ids),
                    step_metrics.c.owner == owner,
                    step_metrics.c.kind == RequestKind.FORWARD_BACKWARD.value,
                )
                .group_by(step_metrics.c.run_id)
            )
            rows = conn.execute(select(step_metrics).where(step_metrics.c.id.in_(latest))).mappings().all()
            steps = dict(
                conn.execute(
                    select(step_metrics.c.run_id, func.count())
                    .where(
                        step_metrics.c.run_id.in_(run_ids),
                        step_metrics.c.owner == owner,
                        step_metrics.c.kind == RequestKind.OPTIM_STEP.value,
                    )
                    .group_by(step_metrics.c.run_id)
                ).all()
            )
            return {row["run_id"]: _from_row(row, int(steps.get(row["run_id"], 0))) for row in rows}

        return self._db.read(txn)


def _from_row(row: RowMapping, step: int) -> StepMetrics:
    return StepMetrics(
        run_id=row["run_id"],
        owner=row["owner"],
        kind=RequestKind(row["kind"]),
        seq_id=row["seq_id"],
        metrics={str(k): float(v) for k, v in dict(row["metrics"]).items()},
        loss_weight=row["loss_weight"],
        recorded_at=row["recorded_at"],
        step=step,
        id=int(row["id"]),
    )
