"""A training run's step metrics (loss, learning rate, gradient norm, ...) as JSON or CSV, for its owner only.

``GET /api/v1/training_runs/{run_id}/metrics?format=json|csv&after=ID`` — ``after`` returns only rows recorded since
(the console polls with it). Columns are described in ``domain.curves``.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response

from tinkerd.api.routes.common import Context, Owner
from tinkerd.domain import curves
from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ids import validate_run_id
from tinkerd.store.metrics import MAX_ROWS

router = APIRouter()


@router.get("/training_runs/{run_id}/metrics")
def run_metrics(
    run_id: str,
    ctx: Context,
    owner: Owner,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
    after: Annotated[int, Query()] = 0,
    limit: Annotated[int, Query()] = MAX_ROWS,
) -> Response:
    if after < 0 or limit < 1:
        raise InvalidRequestError(f"after must be >= 0 and limit >= 1, got after={after}, limit={limit}")
    run = ctx.store.runs.get(validate_run_id(run_id), owner)  # NotFoundError (404) for another owner's run
    rows = ctx.store.metrics.for_run(run.id, owner, after=after, limit=limit)
    if format == "csv":
        return Response(curves.to_csv(rows), media_type="text/csv; charset=utf-8")
    body = {
        "run_id": run.id,
        "columns": [*curves.FIXED_COLUMNS, *curves.metric_names(rows)],
        "rows": [curves.as_dict(row) for row in rows],
        "last_id": rows[-1].id if rows else after,
    }
    return Response(json.dumps(body, allow_nan=False), media_type="application/json")
