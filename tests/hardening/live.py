"""A whole tinkerd in one process for hardening tests: the real app over a real SQLite store, and a real worker
thread running a tiny random Llama (tests/worker/harness.make_host). Requests go through FastAPI's TestClient.

Unlike tests/api (a fake worker), every accepted request here really runs on the engine, so a request that passes
the API's checks and then trips the engine shows up as a failed future, and a bug there as a "server" error.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.worker.harness import BASE, VOCAB, make_host
from tinkerd.api import ApiSettings, FutureNotifier, InProcess, ServedModelInfo, create_app
from tinkerd.store import Store, default_url
from tinkerd.worker.loop import Worker, WorkerConfig

CONTEXT = 256  # the tiny model's max_position_embeddings
PROTOBUF = "application/x-protobuf"
SERVED = ServedModelInfo(
    name=BASE, tokenizer_id=None, arch="LlamaForCausalLM", vocab_size=VOCAB, max_context_length=CONTEXT,
    eos_token_ids=(2,),
)  # fmt: skip


@dataclass
class Live:
    """One running tinkerd: a TestClient per API key, the store and the worker."""

    store: Store
    worker: Worker
    client: TestClient
    data_dir: Path
    _stop: threading.Event
    _thread: threading.Thread
    _seq: dict[str, int] = field(default_factory=dict)

    def post(self, path: str, body: Any = None, *, key: str | None = None, **kwargs: Any) -> Any:
        """POST JSON as the user of ``key`` (default: the client's key)."""
        headers = {
            "content-type": "application/json",
            **kwargs.pop("headers", {}),
            **({"X-API-Key": key} if key else {}),
        }
        # allow_nan: NaN and Infinity literals are not JSON, but a client may send them anyway.
        content = json.dumps(body, allow_nan=True).encode()
        return self.client.post(f"/api/v1/{path}", content=content, headers=headers, **kwargs)

    def get(self, path: str, *, key: str | None = None, **kwargs: Any) -> Any:
        return self.client.get(f"/api/v1/{path}", headers={"X-API-Key": key} if key else {}, **kwargs)

    def ok(self, path: str, body: Any = None, *, key: str | None = None) -> Any:
        response = self.post(path, body, key=key)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    def wait(self, request_id: str, *, key: str | None = None, accept: str = "application/json") -> Any:
        """The finished future's answer (JSON body, or raw bytes for protobuf), re-polling on try_again."""
        deadline = time.monotonic() + 30.0
        while True:
            response = self.post("retrieve_future", {"request_id": request_id}, key=key, headers={"accept": accept})
            assert response.status_code == 200, response.text
            if response.headers["content-type"].startswith(PROTOBUF):
                return response.content
            body = response.json()
            if body.get("type") != "try_again":
                return body
            assert time.monotonic() < deadline, f"{request_id} never finished"

    def result(self, request_id: str, *, key: str | None = None) -> Any:
        body = self.wait(request_id, key=key)
        assert "error" not in body, body
        return body

    def session(self, *, key: str | None = None) -> str:
        return self.ok("create_session", {"tags": [], "sdk_version": "0.38.0"}, key=key)["session_id"]

    def run(self, *, key: str | None = None, rank: int = 2, session_id: str | None = None) -> str:
        session_id = session_id or self.session(key=key)
        body = {"session_id": session_id, "model_seq_id": 0, "base_model": BASE, "lora_config": {"rank": rank}}
        future = self.ok("create_model", body, key=key)
        model_id = self.result(future["request_id"], key=key)["model_id"]
        self._seq[model_id] = 1
        return model_id

    def next_seq(self, model_id: str) -> int:
        """The seq_id the run's next request should carry (the SDK's counter)."""
        seq = self._seq[model_id]
        self._seq[model_id] = seq + 1
        return seq

    def sampler(self, *, key: str | None = None, model_path: str | None = None) -> str:
        body: dict[str, Any] = {"session_id": self.session(key=key), "sampling_session_seq_id": 0}
        body.update({"model_path": model_path} if model_path else {"base_model": BASE})
        return self.ok("create_sampling_session", body, key=key)["sampling_session_id"]

    def pause(self) -> None:
        """Stop the worker thread (what it claimed goes back to pending); requests queue up until ``resume``."""
        self._stop.set()
        self.worker.wake()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def resume(self) -> None:
        self._stop, self._thread = _start_worker(self.worker)

    def close(self) -> None:
        self.pause()
        self.client.__exit__(None, None, None)
        self.store.close()


ALICE, BOB = "tml-alice", "tml-bob"
USERS = {ALICE: "alice", BOB: "bob"}


def start_live(
    data_dir: Path,
    *,
    api_keys: Mapping[str, str] | None = USERS,
    start_worker: bool = True,
    busy_timeout_ms: int = 5000,
    **settings: Any,
) -> Live:
    """A running tinkerd; by default with two users, and the client speaking as the first key (alice)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.open(default_url(data_dir), busy_timeout_ms=busy_timeout_ms)
    notifier = FutureNotifier()
    worker = Worker(store, {BASE: make_host()}, data_dir, notifier.notify, config=WorkerConfig(poll_interval_s=0.02))
    options: dict[str, Any] = {"long_poll_s": 1.0, "poll_interval_s": 0.1, "api_keys": api_keys, **settings}
    app = create_app(store, [SERVED], InProcess(notifier, worker.accept), ApiSettings(**options))
    key = next(iter(api_keys)) if api_keys else "tml-hardening"
    client = TestClient(app, headers={"X-API-Key": key})
    client.__enter__()
    stop, thread = _start_worker(worker)
    live = Live(store, worker, client, data_dir, stop, thread)
    if not start_worker:
        live.pause()
    return live


def _start_worker(worker: Worker) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), name="live-worker", daemon=True)
    thread.start()
    return stop, thread
