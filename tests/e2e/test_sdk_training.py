"""The official SDK's training flow against `tinkerd serve`: create, forward_backward, optim_step, forward, save and
restore state, and the RestClient's view of the run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, Server

pytestmark = pytest.mark.e2e

PROMPT = [1, 17, 300, 4000, 42, 7, 99]


def datum(tokens: list[int] = PROMPT) -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
            "weights": types.TensorData(data=[1.0] * (len(tokens) - 1), dtype="float32", shape=[len(tokens) - 1]),
        },
    )


@pytest.fixture
def service(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def _loss(output: types.ForwardBackwardOutput) -> float:
    return output.metrics["loss:sum"]


def test_train_step_by_step(server: Server, service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(
        base_model=server.model, rank=4, seed=1, user_metadata={"purpose": "e2e"}
    ).result()
    info = training.get_info()
    assert info.model_data.model_name == server.model and info.lora_rank == 4
    assert training.get_tokenizer().encode("hello")  # the tokenizer_id we report loads on the client

    before = training.forward([datum()], "cross_entropy").result()
    logprobs = before.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert logprobs.shape == (len(PROMPT) - 1,) and np.all(logprobs < 0)
    assert _loss(before) == pytest.approx(-float(logprobs.sum()), rel=1e-4)

    for _ in range(3):
        training.forward_backward([datum()], "cross_entropy").result()
        step = training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert step.metrics is not None
    after = training.forward([datum()], "cross_entropy").result()
    assert _loss(after) < _loss(before)  # training moved the adapter the right way

    saved = training.save_state("e2e-state").result()
    assert saved.path == f"tinker://{training.model_id}/weights/e2e-state"

    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    run = rest.get_training_run(training.model_id).result()
    assert run.user_metadata == {"purpose": "e2e"}
    assert run.base_model == server.model and run.lora_rank == 4
    assert run.last_checkpoint is not None and run.last_checkpoint.tinker_path == saved.path
    checkpoints = rest.list_checkpoints(training.model_id).result().checkpoints
    assert [c.checkpoint_id for c in checkpoints] == ["weights/e2e-state"]


def test_restore_from_state_with_and_without_optimizer(server: Server, service: tinker.ServiceClient) -> None:
    training = service.create_lora_training_client(base_model=server.model, rank=4).result()
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    path = training.save_state("restore-me").result().path
    expected = _loss(training.forward([datum()], "cross_entropy").result())

    with_optimizer = service.create_training_client_from_state_with_optimizer(path).result()
    assert with_optimizer.model_id.endswith(":train:1")  # the id the SDK computes itself
    assert _loss(with_optimizer.forward([datum()], "cross_entropy").result()) == pytest.approx(expected, rel=1e-3)
    with_optimizer.forward_backward([datum()], "cross_entropy").result()
    with_optimizer.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    weights_only = service.create_training_client_from_state(path).result()
    assert weights_only.get_info().lora_rank == 4
    assert _loss(weights_only.forward([datum()], "cross_entropy").result()) == pytest.approx(expected, rel=1e-3)


@pytest.mark.filterwarnings("ignore:DEPRECATED:FutureWarning")  # the older *_async spelling, on purpose
def test_async_training_calls(server: Server, service: tinker.ServiceClient) -> None:
    async def flow() -> tuple[float, float]:
        training = await service.create_lora_training_client(base_model=server.model, rank=4)
        # Submit both before waiting, as the SDK recommends: the server orders them by seq_id.
        fwd_bwd = training.forward_backward([datum()], "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=1e-2))
        first = await fwd_bwd
        await optim
        second = await training.forward([datum()], "cross_entropy")
        # The older *_async spellings still work.
        saved = await (await training.save_state_async("async-state")).result_async()
        assert saved.path.endswith("/weights/async-state")
        return _loss(first), _loss(second)

    first, second = asyncio.run(flow())
    assert second < first


def test_user_mistakes_surface_as_sdk_errors(server: Server, service: tinker.ServiceClient) -> None:
    with pytest.raises(tinker.NotFoundError):
        service.create_lora_training_client(base_model="no/such-model", rank=4).result()
    training = service.create_lora_training_client(base_model=server.model, rank=4).result()
    # Checked at submit (the API knows the vocabulary): an HTTP 400.
    with pytest.raises(tinker.BadRequestError, match="vocabulary"):
        training.forward([datum([1, 10**6, 2])], "cross_entropy").result()
    # Checked when the request runs (the worker): a failed future, marked as the user's error.
    with pytest.raises(tinker.RequestFailedError, match="vocabulary") as failed:
        training.forward([datum([1, 2, 10**6])], "cross_entropy").result()
    assert failed.value.category.value == "user"
    with pytest.raises(tinker.RequestFailedError, match="already exists"):
        training.save_state("twice").result()
        training.save_state("twice").result()
    # The run survives its user's mistakes.
    assert _loss(training.forward([datum()], "cross_entropy").result()) > 0


def test_server_capabilities(server: Server) -> None:
    capabilities = tinker.RestClient(base_url=server.url, api_key=API_KEY).get_server_capabilities().result()
    assert [m.model_name for m in capabilities.supported_models] == [server.model]
    assert capabilities.supported_models[0].max_context_length == 512
