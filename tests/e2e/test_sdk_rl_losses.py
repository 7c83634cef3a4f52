"""The RL losses the cookbook's recipes default to, through the SDK against `tinkerd serve`: stable_reinforce on
samples recorded with record_stability_info and named by provenance spans, and gspo without a sequence_ratio_mask."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, Server

pytestmark = pytest.mark.e2e

PROMPT = [1, 17, 300, 4000, 42]


@pytest.fixture
def service(server: Server) -> Iterator[tinker.ServiceClient]:
    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success").result()


def _rl_data(sequences: list[types.SampledSequence], advantages: list[float]) -> list[types.Datum]:
    """Prompt + completion shifted by one, advantages on the sampled tokens only, as the cookbook builds them."""
    data = []
    for sequence, advantage in zip(sequences, advantages, strict=True):
        tokens, n_prompt, n_sampled = PROMPT + sequence.tokens, len(PROMPT), len(sequence.tokens)
        inputs: dict[str, Any] = {  # plain lists: the SDK types them by key
            "target_tokens": tokens[1:],
            "logprobs": [0.0] * (n_prompt - 1) + list(sequence.logprobs or []),
            "advantages": [0.0] * (n_prompt - 1) + [advantage] * n_sampled,
        }
        data.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return data


def _with_provenance(datum: types.Datum, sequence_id: str) -> types.Datum:
    n_prompt = len(PROMPT)
    n_sampled = datum.model_input.length - n_prompt + 1
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, length=n_prompt),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=n_sampled - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=n_prompt - 1),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=n_sampled),
        ],
    )


def test_stable_reinforce_with_recorded_samples_and_gspo_without_a_mask(
    server: Server, service: tinker.ServiceClient
) -> None:
    training = service.create_lora_training_client(base_model=server.model, rank=4, seed=0).result()
    sampler = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    response = sampler.sample(
        types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=types.SamplingParams(max_tokens=4, seed=3)
    ).result()
    sequences = list(response.sequences)
    assert all(s.sequence_id for s in sequences)
    data = _rl_data(sequences, advantages=[1.0, -1.0])

    traced = [_with_provenance(d, s.sequence_id or "") for d, s in zip(data, sequences, strict=True)]
    out = training.forward_backward(traced, "stable_reinforce", {"kl_coeff": 0.01}).result()
    assert math.isfinite(out.metrics["loss:sum"])
    assert [o["logprobs"].to_numpy().shape for o in out.loss_fn_outputs] == [(d.model_input.length,) for d in data]
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    # Without provenance the server refuses, naming what is missing, as Tinker does.
    with pytest.raises(tinker.RequestFailedError, match="provenance"):
        training.forward_backward(data, "stable_reinforce").result()

    # GSPO's sequence ratio then runs over the sampled tokens.
    out = training.forward_backward(traced, "gspo").result()
    assert math.isfinite(out.metrics["loss:sum"])
