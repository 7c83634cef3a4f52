"""``top_k_logprobs`` on forward and forward_backward (a Loops option): each position's most likely next tokens from
the same pass, on the packed and the generic engine path, against the Hugging Face model's own distribution."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_served_model import batch, grads, randomize_b
from tests.engine.tiny_models import tiny_generic_model, tiny_model
from tinkerd.domain.ops import LoraConfig
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.served_model import ForwardJob, ServedModel

FP32 = EngineConfig(train_dtype="float32", sample_dtype="float32")


def _hf_top_k(hf: torch.nn.Module, tokens: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    return top.values, top.indices


@pytest.mark.parametrize("path", ["packed", "generic"])
def test_top_k_matches_the_models_own_distribution_and_leaves_training_alone(path: str) -> None:
    hf = tiny_model("llama") if path == "packed" else tiny_generic_model("phi")
    model = ServedModel("tiny", hf, FP32)
    other = ServedModel("tiny", tiny_model("llama") if path == "packed" else tiny_generic_model("phi"), FP32)
    for m in (model, other):
        m.create_adapter("a", LoraConfig(rank=4, seed=2))
    data = batch(3)
    (with_top,) = model.forward([ForwardJob("a", data, "cross_entropy", backward=True, top_k=5)])
    (without,) = other.forward([ForwardJob("a", data, "cross_entropy", backward=True)])
    for out, plain, d in zip(with_top.loss_fn_outputs, without.loss_fn_outputs, data, strict=True):
        assert out["top_k_logprobs"].shape == (len(d.tokens), 5)
        assert out["top_k_token_ids"].dtype == "int64"
        values, ids = _hf_top_k(hf, d.tokens, 5)  # a fresh adapter (B = 0) is the base model
        torch.testing.assert_close(torch.tensor(out["top_k_logprobs"].values).view(-1, 5), values, atol=1e-5, rtol=0)
        assert torch.equal(torch.tensor(out["top_k_token_ids"].values).view(-1, 5), ids)
        assert out["logprobs"].values == plain["logprobs"].values
        assert "top_k_logprobs" not in plain
    for x, y in zip(grads(model, "a"), grads(other, "a"), strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_top_k_follows_the_adapter_and_only_the_asking_request_gets_it() -> None:
    model = ServedModel("tiny", tiny_model("llama"), FP32)
    model.create_adapter("a", LoraConfig(rank=4, seed=2))
    randomize_b(model, "a", 4)
    data = batch(4, lengths=(6, 3))
    asking, quiet = model.forward(
        [ForwardJob("a", data, "cross_entropy", top_k=3), ForwardJob(None, data, "cross_entropy")]
    )
    assert all("top_k_logprobs" not in out for out in quiet.loss_fn_outputs)
    for out, base in zip(asking.loss_fn_outputs, quiet.loss_fn_outputs, strict=True):
        values = torch.tensor(out["top_k_logprobs"].values).view(-1, 3)
        assert bool((values[:, :-1] >= values[:, 1:]).all())  # most likely first
        # the adapter's own target logprob never beats its top-1
        assert bool((torch.tensor(out["logprobs"].values) <= values[:, 0] + 1e-6).all())
        assert out["logprobs"].values != base["logprobs"].values  # the adapter moved the distribution
