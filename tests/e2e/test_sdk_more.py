"""More of the SDK against `tinkerd serve`: a client-side DPO-style custom loss, top-k prompt logprobs, and several
training clients at once on one base model."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import tinker
import torch
from tinker import types

from tests.e2e.conftest import API_KEY, Server
from tests.e2e.test_sdk_training import PROMPT, datum

pytestmark = pytest.mark.e2e

CHOSEN = [1, 17, 300, 4000, 42, 7, 99, 5]
REJECTED = [1, 17, 300, 4000, 42, 8, 123, 6]


@pytest.fixture
def service(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def _dpo_loss(data: Sequence[types.Datum], logprobs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigmoid(beta * (logp(chosen) - logp(rejected))) for pairs (chosen, rejected) in order."""
    beta = 0.5
    losses = [
        -torch.nn.functional.logsigmoid(beta * (logprobs[i].sum() - logprobs[i + 1].sum()))
        for i in range(0, len(logprobs), 2)
    ]
    loss = torch.stack(losses).sum()
    return loss, {"dpo_loss": float(loss.detach())}


def test_forward_backward_custom_with_a_dpo_loss_trains(server: Server, service: tinker.ServiceClient) -> None:
    trainer = service.create_lora_training_client(base_model=server.model, rank=4, seed=0).result()
    pair = [datum(CHOSEN), datum(REJECTED)]
    losses = []
    for _ in range(4):
        out = trainer.forward_backward_custom(pair, _dpo_loss).result()
        assert all("logprobs" in o for o in out.loss_fn_outputs)
        losses.append(out.metrics["dpo_loss"])
        trainer.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]


def test_top_k_prompt_logprobs_agree_with_prompt_logprobs(server: Server, service: tinker.ServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=server.model).result()
    response = sampler.sample(
        types.ModelInput.from_ints(PROMPT),
        num_samples=1,
        sampling_params=types.SamplingParams(max_tokens=1),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=3,
    ).result()
    prompt_lp = response.prompt_logprobs
    topk = response.topk_prompt_logprobs
    assert prompt_lp is not None and topk is not None
    assert prompt_lp[0] is None and topk[0] is None
    assert len(prompt_lp) == len(topk) == len(PROMPT)
    for position in range(1, len(PROMPT)):
        row = topk[position]
        lp = prompt_lp[position]
        assert row is not None and len(row) == 3 and lp is not None
        values = [v for _, v in row]
        assert values == sorted(values, reverse=True)
        assert lp <= values[0] + 1e-4  # the actual token is at most as likely as the most likely one
        if PROMPT[position] in [t for t, _ in row]:
            assert dict(row)[PROMPT[position]] == pytest.approx(lp, abs=1e-3)


def test_several_training_clients_at_once_stay_independent(server: Server, service: tinker.ServiceClient) -> None:
    trainers = [service.create_lora_training_client(base_model=server.model, rank=4, seed=i).result() for i in range(3)]
    probe = [datum()]

    def train(i: int) -> float:
        trainer = trainers[i]
        for _ in range(i * 2):  # client 0 never trains, 1 twice, 2 four times
            trainer.forward_backward(probe, "cross_entropy").result()
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        return float(trainer.forward(probe, "cross_entropy").result().metrics["loss:sum"])

    before = float(trainers[0].forward(probe, "cross_entropy").result().metrics["loss:sum"])
    with ThreadPoolExecutor(3) as pool:
        after = list(pool.map(train, range(3)))
    assert after[0] == pytest.approx(before, abs=1e-4)  # untouched by its neighbours' training
    assert after[2] < after[1] < after[0]
