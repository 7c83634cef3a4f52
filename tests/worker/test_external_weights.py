"""save_weights_external through the worker: a PEFT adapter (no optimizer) under external_weights/, with its TTL."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.worker.harness import Api, RequestFailed, datums, drain
from tinkerd.domain.records import RequestKind
from tinkerd.domain.requests import PathResult, SaveWeights
from tinkerd.engine.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_STATE
from tinkerd.worker.loop import Worker

pytestmark = pytest.mark.integration


def export(api: Api, run: str, name: str, ttl_seconds: int | None = None) -> str:
    request = SaveWeights(run, "external_weights", name, ttl_seconds=ttl_seconds)
    return api.submit(RequestKind.SAVE_WEIGHTS_EXTERNAL, run, request)


def test_export_writes_the_trained_adapter_without_optimizer(api: Api, worker: Worker) -> None:
    run = api.create_model()
    api.forward_backward(run, datums(0))
    api.optim_step(run)
    state = api.save(run, "state")
    exported = export(api, run, "out", ttl_seconds=3600)
    drain(worker)
    result = api.result(exported)
    assert isinstance(result, PathResult) and result.path == f"tinker://{run}/external_weights/out"
    row = api.store.checkpoints.get(result.path, api.owner)
    assert row.kind == "external_weights" and row.expires_at is not None and row.size_bytes == result.size_bytes

    directory = worker.files.dir_of(row.path)
    assert (directory / ADAPTER_CONFIG).is_file() and not (directory / OPTIMIZER_STATE).exists()
    saved = worker.files.dir_of(api.store.checkpoints.get(saved_path(api, state), api.owner).path)
    exported_tensors, state_tensors = load_file(directory / ADAPTER_WEIGHTS), load_file(saved / ADAPTER_WEIGHTS)
    assert sorted(exported_tensors) == sorted(state_tensors)
    assert all(exported_tensors[k].equal(state_tensors[k]) for k in state_tensors)


def test_an_export_name_is_never_overwritten(api: Api, worker: Worker) -> None:
    run = api.create_model()
    first, second = export(api, run, "out"), export(api, run, "out")
    drain(worker)
    api.result(first)
    with pytest.raises(RequestFailed) as error:
        api.result(second)
    assert error.value.category == "user" and "already exists" in error.value.message


def saved_path(api: Api, request_id: str) -> str:
    result = api.result(request_id)
    assert isinstance(result, PathResult)
    return result.path
