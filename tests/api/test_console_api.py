"""The console's JSON API and page serving, in process: owner scoping as in the Tinker API, run state and last loss
from the recorded metrics, queue depth, security headers, and clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import SERVED
from tests.store.conftest import add_run
from tinkerd.api import ApiSettings, FutureNotifier, InProcess, create_app
from tinkerd.console import ConsoleConfig, mount_console
from tinkerd.domain.paths import CheckpointKind
from tinkerd.domain.records import Checkpoint, RequestKind, StepMetrics
from tinkerd.store import Store

ALICE, BOB = {"X-API-Key": "tml-alice"}, {"X-API-Key": "tml-bob"}


@pytest.fixture
def client(store: Store) -> Iterator[TestClient]:
    settings = ApiSettings(api_keys={"tml-alice": "alice", "tml-bob": "bob"})
    app = create_app(store, SERVED, InProcess(FutureNotifier(), lambda _f, _r: None), settings)
    roles = [{"role": "worker", "id": "w1", "detail": "test", "models": [SERVED[0].name]}]
    mount_console(app, ConsoleConfig(roles=lambda: roles))
    with TestClient(app) as test_client:
        yield test_client


def _step(store: Store, run_id: str, kind: RequestKind, metrics: dict[str, float]) -> None:
    future = store.futures.submit(owner="alice", model_id=run_id, seq_id=None, kind=kind, payload=b"{}")
    loss_weight = 4.0 if kind is RequestKind.FORWARD_BACKWARD else None
    step = StepMetrics(run_id, "alice", kind, None, metrics, loss_weight, datetime(2026, 1, 1, tzinfo=UTC))
    store.futures.complete(future.request_id, b"{}", metrics=step)


def test_pages_are_served_with_a_content_security_policy(client: TestClient) -> None:
    page = client.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert 'src="/console/static/vendor/uplot-1.6.32/uPlot.iife.min.js"' in page.text
    script = client.get("/console/static/pages.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/console/static/vendor/uplot-1.6.32/uPlot.iife.min.js").status_code == 200
    assert client.get("/console/static/../app.py").status_code == 404
    assert client.get("/console/static/nothing.js").status_code == 404
    assert client.get("/", follow_redirects=False).headers["location"] == "/console/"
    # The Tinker API keeps its own headers: the console's policy is for the console's paths.
    assert "content-security-policy" not in client.get("/api/v1/healthz").headers


def test_runs_are_scoped_to_the_key_and_carry_state_and_last_loss(client: TestClient, store: Store) -> None:
    add_run(store, "a:train:0", "alice")
    add_run(store, "b:train:0", "bob")
    _step(store, "a:train:0", RequestKind.FORWARD_BACKWARD, {"loss:sum": 8.0})
    _step(store, "a:train:0", RequestKind.OPTIM_STEP, {"learning_rate": 0.1})
    _step(store, "a:train:0", RequestKind.FORWARD_BACKWARD, {"loss:sum": 6.0})

    assert client.get("/console/api/runs").status_code == 401
    assert client.get("/console/api/runs", headers={"X-API-Key": "tml-nobody"}).status_code == 401
    assert client.get("/console/api/me", headers=ALICE).json()["owner"] == "alice"
    runs = client.get("/console/api/runs", headers=ALICE).json()["runs"]
    assert [(r["id"], r["state"], r["last_step"], r["last_loss"]) for r in runs] == [("a:train:0", "idle", 1, 1.5)]
    assert [r["id"] for r in client.get("/console/api/runs", headers=BOB).json()["runs"]] == ["b:train:0"]
    assert client.get("/console/api/runs/a:train:0", headers=BOB).status_code == 404
    detail = client.get("/console/api/runs/a:train:0", headers=ALICE).json()
    assert detail["run"]["lora"]["rank"] == 32 and detail["checkpoints"] == [] and detail["queued"] == 0

    # Work waiting for the run makes it "training" and shows as its queue depth on the server page.
    store.futures.submit(owner="alice", model_id="a:train:0", seq_id=None, kind=RequestKind.OPTIM_STEP, payload=b"")
    assert client.get("/console/api/runs", headers=ALICE).json()["runs"][0]["state"] == "training"
    server = client.get("/console/api/server", headers=ALICE).json()
    assert server["queue"] == [{"model_id": "a:train:0", "pending": 1, "running": 0}]
    assert server["roles"][0]["id"] == "w1" and server["models"][0]["name"] == SERVED[0].name
    assert server["memory"]["rss_bytes"] > 0
    assert client.get("/console/api/server", headers=BOB).json()["queue"] == []
    # Bob sees how busy the server is, in counts only: not whose work, nor for which run.
    store.futures.submit(owner="bob", model_id="b:train:0", seq_id=None, kind=RequestKind.OPTIM_STEP, payload=b"")
    total = {"model_id": "all", "pending": 2, "running": 0}
    assert client.get("/console/api/server", headers=BOB).json()["queue_total"] == total

    sessions = client.get("/console/api/sessions", headers=ALICE).json()["sessions"]
    assert [(s["id"], s["runs"]) for s in sessions] == [("sess-alice", ["a:train:0"])]


def test_tokenizer_errors_name_the_problem(client: TestClient) -> None:
    unknown = client.post("/console/api/tokenize", json={"model": "nope", "text": "hi"}, headers=ALICE)
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    no_tokenizer = client.post("/console/api/tokenize", json={"model": SERVED[0].name, "text": "hi"}, headers=ALICE)
    assert no_tokenizer.status_code == 404 and "no tokenizer" in no_tokenizer.json()["error"]
    bad = client.post(
        "/console/api/tokenize", json={"model": SERVED[0].name, "messages": [{"role": "x"}]}, headers=ALICE
    )
    assert bad.status_code == 400
    assert client.get("/console/api/runs?limit=0", headers=ALICE).status_code == 400


def test_the_playground_offers_every_readable_sampler_checkpoint(client: TestClient, store: Store) -> None:
    model = SERVED[0].name
    add_run(store, "a:train:0", "alice", base_model=model)
    add_run(store, "b:train:0", "bob", base_model=model)
    add_run(store, "b:train:1", "bob", base_model="not-served-here")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    saved: list[tuple[str, CheckpointKind, str, str, bool]] = [
        ("a:train:0", "sampler_weights", "mine", "alice", False),
        ("a:train:0", "weights", "state", "alice", False),  # training state: nothing to sample
        ("b:train:0", "sampler_weights", "bobs-private", "bob", False),
        ("b:train:0", "sampler_weights", "bobs-shared", "bob", True),
        ("b:train:1", "sampler_weights", "elsewhere", "bob", True),  # its base model is not served
    ]
    for run_id, kind, name, who, public in saved:
        store.checkpoints.add(Checkpoint(run_id, kind, name, who, at, public=public))

    def offered(headers: dict[str, str]) -> list[tuple[str | None, str | None, bool]]:
        models = client.get("/console/api/samplables", headers=headers).json()["models"]
        assert all(m["base_model"] == model for m in models)
        return [(m["model_path"], m["owner"], m["mine"]) for m in models]

    shared = ("tinker://b:train:0/sampler_weights/bobs-shared", "bob")
    assert sorted(offered(ALICE), key=str) == sorted(
        [(None, None, True), ("tinker://a:train:0/sampler_weights/mine", "alice", True), (*shared, False)], key=str
    )
    assert sorted(offered(BOB), key=str) == sorted(
        [(None, None, True), ("tinker://b:train:0/sampler_weights/bobs-private", "bob", True), (*shared, True)],
        key=str,
    )


def test_runs_are_listed_newest_first(client: TestClient, store: Store) -> None:
    for n, day in enumerate([3, 1, 2]):
        add_run(store, f"a:train:{n}", "alice", at=datetime(2026, 1, day, tzinfo=UTC))
    listed = client.get("/console/api/runs", headers=ALICE).json()
    assert [r["id"] for r in listed["runs"]] == ["a:train:0", "a:train:2", "a:train:1"]
    assert listed["total_count"] == 3
