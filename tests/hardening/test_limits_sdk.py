"""The official SDK against a full queue: it gets 429s, backs off, retries the same request, and finishes once the
queue drains, for sampling (asample's back-pressure path) and for training submits alike.

tinkerd runs in this process (``tinkerd.running``, real HTTP on 127.0.0.1) with a per-user cap of 3 queued
requests. The queue is filled with forward_backward requests at seq_ids 10-12 of a run, which cannot run before
seq_ids 1-9: they stay queued until the test sends those, which then always pass (they fill the gap).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import func, select
from tinker import types

from tests.engine.tiny_models import tiny_model
from tests.hardening.protos import fwdbwd_bytes
from tinkerd.server import running
from tinkerd.store import Store, default_url
from tinkerd.store.tables import futures

pytestmark = pytest.mark.e2e

KEY = "tml-hardening"


def _queued(data_dir: Path, kind: str) -> int:
    store = Store.open(default_url(data_dir), create_schema=False)
    try:
        query = select(func.count()).select_from(futures).where(futures.c.kind == kind)
        return store.db.read(lambda conn: conn.execute(query).scalar_one())
    finally:
        store.close()


class Background:
    """A blocking SDK call on its own thread."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.result = call()
            except BaseException as error:
                self.error = error

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the SDK call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    out = tmp_path / "tiny-llama"
    model: Any = tiny_model("llama")
    model.save_pretrained(out)
    return out


def test_sdk_backs_off_from_a_full_queue_and_finishes(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    data_dir = tmp_path / "data"
    with running(str(model_dir), data_dir, cache_dir=tmp_path / "cache", max_queued_per_user=3) as url:
        service = tinker.ServiceClient(base_url=url, api_key=KEY)
        trainer = service.create_lora_training_client(base_model=str(model_dir), rank=2).result()
        sampler = service.create_sampling_client(base_model=str(model_dir)).result()
        blocker = service.create_lora_training_client(base_model=str(model_dir), rank=2).result().model_id

        http = httpx.Client(base_url=f"{url}/api/v1", headers={"X-API-Key": KEY})
        proto = {"content-type": "application/x-protobuf"}
        for seq in (10, 11, 12):  # queued behind seq_ids 1-9, which nobody has sent: the queue is full
            response = http.post("/forward_backward", content=fwdbwd_bytes(blocker, seq, [1, 2]), headers=proto)
            assert response.status_code == 200, response.text
        assert http.post("/forward_backward", content=fwdbwd_bytes(blocker, 13, [1]), headers=proto).status_code == 429

        prompt = types.ModelInput.from_ints([1, 2, 3])
        params = types.SamplingParams(max_tokens=3, temperature=0.0)
        sampling = Background(lambda: sampler.sample(prompt, num_samples=2, sampling_params=params).result())
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([4, 5, 6]),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=[5, 6, 7], dtype="int64", shape=[3]),
                "weights": types.TensorData(data=[1.0, 1.0, 1.0], dtype="float32", shape=[3]),
            },
        )
        training = Background(lambda: trainer.forward_backward([datum], "cross_entropy").result())

        # Refused, and still trying: nothing of theirs is in the ledger, and neither call has failed.
        sampling.thread.join(4.0)
        training.thread.join(0.1)
        assert sampling.thread.is_alive() and training.thread.is_alive()
        assert _queued(data_dir, "sample") == 0 and _queued(data_dir, "forward_backward") == 3

        for seq in range(1, 10):  # fill the gap: the blocker's queue runs and drains
            response = http.post("/forward_backward", content=fwdbwd_bytes(blocker, seq, [1, 2]), headers=proto)
            assert response.status_code == 200, response.text
        sampled = sampling.join(120.0)
        assert [len(sequence.tokens) for sequence in sampled.sequences] == [3, 3]
        output = training.join(120.0)
        assert len(output.loss_fn_outputs) == 1 and output.metrics["loss:sum"] > 0
        http.close()
