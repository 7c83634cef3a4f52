"""API fixtures: the real app over a real SQLite store, with a fake worker thread completing futures."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.api.fake_worker import FakeWorker
from tinkerd.api import ApiSettings, FutureNotifier, InProcess, ServedModelInfo, create_app
from tinkerd.store import Store, default_url


class Response(Protocol):
    """What tests read from a response (Starlette's TestClient returns httpx2's or httpx's, whichever is installed)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def content(self) -> bytes: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


MODEL = "tiny/model"
VOCAB = 100
CONTEXT = 64
PROTOBUF = "application/x-protobuf"

SERVED = [
    ServedModelInfo(
        name=MODEL, tokenizer_id="tiny/tokenizer", arch="LlamaForCausalLM", vocab_size=VOCAB,
        max_context_length=CONTEXT, eos_token_ids=(2,),
    )
]  # fmt: skip


class Api:
    """A TestClient plus the calls most tests need, returning parsed JSON."""

    def __init__(self, client: TestClient, worker: FakeWorker, store: Store) -> None:
        self.client = client
        self.worker = worker
        self.store = store

    def post(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Response:
        return self.client.post(f"/api/v1/{path}", json=body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.client.get(f"/api/v1/{path}", **kwargs)

    def ok(self, path: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        response = self.post(path, body, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def session(self) -> str:
        return self.ok("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})["session_id"]

    def retrieve(self, request_id: str, accept: str = "application/json") -> Response:
        response = self.post("retrieve_future", {"request_id": request_id}, headers={"accept": accept})
        assert response.status_code == 200, response.text
        return response

    def result(self, request_id: str, accept: str = "application/json") -> Any:
        """The result, re-polling on try_again as the SDK does (a short long-poll may end before a busy worker)."""
        deadline = time.monotonic() + 60.0
        while True:
            body = self.retrieve(request_id, accept).json()
            if body.get("type") != "try_again" or time.monotonic() > deadline:
                break
        assert "error" not in body and body.get("type") != "try_again", body
        return body

    def model(self, session_id: str | None = None, seq: int = 0, **extra: Any) -> str:
        session_id = session_id or self.session()
        body = {"session_id": session_id, "model_seq_id": seq, "base_model": MODEL, "lora_config": {"rank": 4}, **extra}
        future = self.ok("create_model", body)
        return self.result(future["request_id"])["model_id"]

    def forward_backward(
        self, model_id: str, seq_id: int, tokens: list[int] | None = None, *, loss_fn: str = "cross_entropy",
        forward_only: bool = False, headers: dict[str, str] | None = None,
    ) -> Response:  # fmt: skip
        body = fwdbwd_proto(model_id, seq_id, tokens or [1, 2, 3], loss_fn=loss_fn, forward_only=forward_only)
        return self.client.post(
            "/api/v1/forward_backward", content=body, headers={"content-type": PROTOBUF, **(headers or {})}
        )


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[*tokens[1:], 0], dtype="int64", shape=[len(tokens)]),
            "weights": types.TensorData(data=[1.0] * len(tokens), dtype="float32", shape=[len(tokens)]),
        },
    )


def fwdbwd_proto(
    model_id: str, seq_id: int, tokens: list[int], *, loss_fn: str = "cross_entropy", forward_only: bool = False
) -> bytes:
    """Exactly the bytes SDK 0.38 sends, built by the SDK's own encoder."""
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum(tokens)], loss_fn="cross_entropy"),
        model_id=model_id,
        seq_id=seq_id,
    )
    message = forward_backward_request_to_proto(request)
    message.forward_only = forward_only
    message.loss_fn = loss_fn  # set here: the SDK's validation would refuse the made-up loss names some tests use
    return message.SerializeToString()


def tensor_json(values: list[int] | list[float], dtype: str) -> dict[str, Any]:
    return {"data": values, "dtype": dtype, "shape": [len(values)]}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(default_url(tmp_path))
    yield opened
    opened.close()


MakeApi = Callable[..., Api]


@pytest.fixture
def make_api(store: Store) -> Iterator[MakeApi]:
    """Build an Api with chosen ApiSettings; every one built is shut down after the test."""
    opened: list[tuple[TestClient, FakeWorker]] = []

    def make(models: Sequence[ServedModelInfo] = SERVED, **settings: Any) -> Api:
        notifier = FutureNotifier()
        worker = FakeWorker(store, notifier.notify)
        options = {"long_poll_s": 2.0, "poll_interval_s": 0.5, **settings}
        dispatch = InProcess(notifier, lambda _future, _request: worker.wake())
        app = create_app(store, models, dispatch, ApiSettings(**options))
        client = TestClient(app, headers={"X-API-Key": "tml-test"})
        client.__enter__()
        worker.start()
        opened.append((client, worker))
        return Api(client, worker, store)

    yield make
    for client, worker in opened:
        worker.stop()
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: MakeApi) -> Api:
    return make_api()


def proto_floats(data: bytes) -> list[float]:
    return np.frombuffer(data, dtype="<f4").tolist()
