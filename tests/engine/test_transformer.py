"""Our packed forward against the Hugging Face forward it replaces."""

from __future__ import annotations

import pytest
import torch

from tests.engine.tiny_models import FAMILIES, tiny_model
from tinkerd.domain.ops import LoraConfig
from tinkerd.engine import head
from tinkerd.engine.lora import LoraRouting, init_lora_weights
from tinkerd.engine.transformer import Transformer


def _hf_logits(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_forward_matches_hugging_face(family: str) -> None:
    hf = tiny_model(family)
    engine = Transformer(tiny_model(family), torch.float32)
    seqs = [[1, 5, 9, 33, 4, 7, 8, 9, 10, 11, 12, 13], [3, 4], [7, 8, 9, 10, 11]]
    with torch.no_grad():
        h = engine.packed_hidden(seqs, LoraRouting.single(sum(map(len, seqs)), None))
        logits = engine.logits(h, LoraRouting.single(h.shape[0], None))
    offset = 0
    for seq in seqs:
        expected = _hf_logits(hf, seq)
        got = logits[offset : offset + len(seq)]
        offset += len(seq)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("save_limit", [head.SAVE_LOGITS_MAX_BYTES, 0], ids=["saved-logits", "recomputed-logits"])
def test_target_logprobs_match_log_softmax_and_their_gradients(
    save_limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(head, "SAVE_LOGITS_MAX_BYTES", save_limit)
    engine = Transformer(tiny_model("llama"), torch.float32)
    seqs = [[1, 5, 9, 33, 4, 7], [3, 4, 5]]
    n = 9
    weights = init_lora_weights(engine.hf, LoraConfig(rank=4, seed=1), engine.device)
    with torch.no_grad():
        for b in weights.b.values():
            b.normal_(std=0.05)
    targets = torch.randint(0, 96, (n, 3))
    routing = LoraRouting.single(n, weights)

    h = engine.packed_hidden(seqs, routing)
    fast = engine.target_logprobs(h, targets, routing)
    (fast * torch.linspace(-1, 1, 3)).sum().backward()
    fast_grads = [p.grad.clone() for p in weights.parameters() if p.grad is not None]
    for p in weights.parameters():
        p.grad = None

    h = engine.packed_hidden(seqs, routing)
    slow = torch.log_softmax(engine.logits(h, routing), dim=-1).gather(1, targets)
    (slow * torch.linspace(-1, 1, 3)).sum().backward()
    slow_grads = [p.grad.clone() for p in weights.parameters() if p.grad is not None]

    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert len(fast_grads) == len(slow_grads) == 2 * (7 * 2 + 1)  # (7 linears x 2 layers + lm_head) x (A, B)
    for f, s in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(f, s, atol=1e-5, rtol=1e-4)
