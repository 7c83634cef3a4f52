"""Combining per-datum metrics into a batch's, by the reduction each name carries ('loss:sum', 'x:mean', ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "sum": sum,
    "mean": lambda values: sum(values) / len(values),
    "max": max,
    "min": min,
}


def reduce_metrics(per_datum: Sequence[dict[str, float]]) -> dict[str, float]:
    """One value per metric name over the datums that report it: ':sum' sums, ':max'/':min' take the extreme,
    ':mean' and any other or missing suffix average."""
    values_by_name: dict[str, list[float]] = {}
    for metrics in per_datum:
        for name, value in metrics.items():
            values_by_name.setdefault(name, []).append(float(value))
    combined: dict[str, float] = {}
    for name, values in values_by_name.items():
        suffix = name.rpartition(":")[2] if ":" in name else ""
        combined[name] = _REDUCERS.get(suffix, _REDUCERS["mean"])(values)
    return combined
