"""Step metrics in the ledger: written with a request's completion, read back in order with steps numbered, scoped
to the run's owner, and paged with ``after``."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.store.conftest import add_run
from tinkerd.domain.records import RequestKind, StepMetrics
from tinkerd.store import Store

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _complete(store: Store, run_id: str, seq_id: int, kind: RequestKind, metrics: dict[str, float]) -> None:
    future = store.futures.submit(owner="alice", model_id=run_id, seq_id=None, kind=kind, payload=b"{}")
    step = StepMetrics(
        run_id, "alice", kind, seq_id, metrics, 4.0 if kind is RequestKind.FORWARD_BACKWARD else None, NOW
    )
    store.futures.complete(future.request_id, b"{}", metrics=step)


def test_metrics_are_recorded_with_the_result_and_read_in_steps(store: Store) -> None:
    add_run(store, "r:train:0", "alice")
    add_run(store, "r:train:1", "alice")
    for i in range(3):
        _complete(store, "r:train:0", 2 * i + 1, RequestKind.FORWARD_BACKWARD, {"loss:sum": 8.0 - i})
        _complete(store, "r:train:0", 2 * i + 2, RequestKind.OPTIM_STEP, {"learning_rate": 0.1, "grad_norm": 1.0})
    _complete(store, "r:train:0", 7, RequestKind.FORWARD_BACKWARD, {"loss:sum": 4.0})  # step 3 under way
    _complete(store, "r:train:1", 1, RequestKind.FORWARD_BACKWARD, {"loss:sum": 1.0})

    rows = store.metrics.for_run("r:train:0", "alice")
    assert [(r.kind.value, r.step) for r in rows] == [
        ("forward_backward", 0), ("optim_step", 0), ("forward_backward", 1), ("optim_step", 1),
        ("forward_backward", 2), ("optim_step", 2), ("forward_backward", 3),
    ]  # fmt: skip
    assert [r.seq_id for r in rows] == list(range(1, 8))
    assert rows[0].metrics == {"loss:sum": 8.0} and rows[0].loss_weight == 4.0

    # Paging keeps the step numbers: rows after the second optim_step start at step 2.
    tail = store.metrics.for_run("r:train:0", "alice", after=rows[3].id)
    assert [(r.kind.value, r.step) for r in tail] == [
        ("forward_backward", 2),
        ("optim_step", 2),
        ("forward_backward", 3),
    ]
    assert store.metrics.for_run("r:train:0", "alice", after=rows[-1].id) == []
    assert len(store.metrics.for_run("r:train:0", "alice", limit=2)) == 2

    assert store.metrics.for_run("r:train:0", "bob") == []  # another owner sees nothing
    last = store.metrics.last_losses(["r:train:0", "r:train:1", "r:train:9"], "alice")
    assert last["r:train:0"].metrics == {"loss:sum": 4.0} and last["r:train:0"].step == 3
    assert last["r:train:1"].step == 0 and "r:train:9" not in last
    assert store.metrics.last_losses(["r:train:0"], "bob") == {}


def test_a_failed_request_records_no_metrics(store: Store) -> None:
    add_run(store, "r:train:0", "alice")
    future = store.futures.submit(
        owner="alice", model_id="r:train:0", seq_id=None, kind=RequestKind.FORWARD_BACKWARD, payload=b"{}"
    )
    store.futures.fail(future.request_id, "boom", "user")
    assert store.metrics.for_run("r:train:0", "alice") == []
