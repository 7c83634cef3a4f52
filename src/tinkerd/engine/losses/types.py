"""What a built-in loss receives for one datum and what it gives back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LossInputs:
    """One datum's view of a loss: the model's target logprobs plus the datum's loss_fn_inputs and the request config.

    ``logprobs`` is ``log p(target_tokens[t] | tokens[: t + 1])``: shape [T], or [T, K] when ``target_tokens`` is
    (T, K) soft targets (cross_entropy only). Every tensor in ``inputs`` shares the leading dimension T.
    """

    logprobs: torch.Tensor  # [T] or [T, K], floating, carries the graph back to the adapter
    inputs: Mapping[str, torch.Tensor]  # loss_fn_inputs by name: target_tokens int64, weights, advantages, ...
    config: Mapping[str, float] = field(default_factory=dict)  # loss_fn_config; a missing key takes the default
    # [T] bool from the datum's provenance: True where the target is a token a sampler produced; None when the datum
    # carries no provenance spans.
    sampled: torch.Tensor | None = None


@dataclass(frozen=True)
class LossOutput:
    """One datum's contribution: ``loss`` is a differentiable scalar (a sum over tokens, never a mean)."""

    loss: torch.Tensor  # scalar
    outputs: dict[str, torch.Tensor]  # per-datum loss_fn_outputs, detached ('logprobs', 'elementwise_loss')
    metrics: dict[str, float]  # named 'name:reduction'; always holds 'loss:sum'
