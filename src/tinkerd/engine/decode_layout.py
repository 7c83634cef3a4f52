"""Weights laid out for decoding: the same linear maps, stored the way the CPU's matmul kernels stream fastest.

Decoding multiplies a few rows by every weight of the model per token, so its speed is how fast the kernels stream
weights. ``nn.Linear`` hands MKL a row-major ``[out, in]`` weight to be used transposed, which on this project's
2-core CPU streams fp32 at ~15 GB/s (batch 1) and reaches ~110 GFLOP/s at batch 32. oneDNN given the same weight
pre-packed in its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what TorchInductor's freezing pass
uses) runs SmolLM2-135M's linears ~2.2x faster at batch 1 (~36 GB/s), ~2.5x at batch 32 and ~1.8x for a prefill of
1,300 tokens, in fp32 and in bf16; end to end, see bench/bench_sampling.py. Where oneDNN is missing, storing the
weight column-major (``W.T`` contiguous, a plain row-major product for MKL) still gains ~1.3x at batch 1.

Either way only the storage changes: the module still computes ``x @ W.T + b`` (up to float summation order), and
LoRA deltas still apply on top in ``apply_linear``. Apply it to a ``Transformer`` that only samples: a packed module
has no backward (it refuses inputs that need gradients) and keeps no plain weight (it holds a ``meta`` tensor of the
right shape, so that reading it fails loudly), except the unembedding, whose weight the tied embedding also reads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tinkerd.engine.transformer import Transformer

log = logging.getLogger(__name__)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies by a oneDNN-packed copy of its weight (inference only)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        kept = weight if keep_weight else torch.empty(weight.shape, dtype=weight.dtype, device="meta")
        self.weight = nn.Parameter(kept, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as nn.Linear names it
        if input.requires_grad and torch.is_grad_enabled():
            # the oneDNN op has no backward: gradients into the layer's input would silently be dropped
            raise RuntimeError("a PackedLinear is for sampling only; train with a Transformer of its own")
        x_N_in = input.reshape(-1, self.in_features).contiguous()
        y_N_out = torch.ops.mkldnn._linear_pointwise(x_N_in, self.packed_weight, self.bias, "none", [], "")
        return y_N_out.view(*input.shape[:-1], self.out_features)


def can_pack(transformer: Transformer) -> bool:
    """oneDNN packing needs a CPU model in fp32 or bf16 and a torch built with oneDNN."""
    return (
        transformer.device.type == "cpu"
        and transformer.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def use_decode_layout(transformer: Transformer, pack: bool | None = None) -> None:
    """Re-store every linear weight of a sampling-only ``transformer`` for decoding, in place.

    ``pack=None`` packs for oneDNN when it can and falls back to the column-major layout otherwise.
    """
    pack = can_pack(transformer) if pack is None else pack
    tied = transformer.embed.weight is transformer.lm_head.weight
    if pack:
        _replace_linears(transformer, tied)
    else:
        for module in transformer.hf.modules():
            if isinstance(module, nn.Linear) and is_row_major(module.weight):
                module.weight = nn.Parameter(module.weight.detach().t().contiguous().t(), requires_grad=False)
        if tied:
            transformer.embed.weight = transformer.lm_head.weight
    log.info("decode layout: %s", "oneDNN-packed" if pack else "column-major")


def _replace_linears(transformer: Transformer, tied: bool) -> None:
    lm_head = transformer.lm_head
    for parent in list(transformer.hf.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                packed = PackedLinear(child, keep_weight=child is lm_head and tied)
                setattr(parent, name, packed)
                if child is lm_head:
                    transformer.lm_head = packed
    if tied:  # the same (row-major) tensor keeps serving the embedding lookup
        transformer.embed.weight = transformer.lm_head.weight


def is_row_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride(1) == 1 and weight.shape[1] > 1
