"""GPT-OSS (transformers' ``gpt_oss``) on the packed forward: attention with learned sinks and per-layer windows.

What differs from the Llama-family body of ``transformer.py``:

- **Attention sinks.** Each query head ``h`` has a learned logit ``sinks[h]`` that joins the softmax over its keys
  as one more column and is then dropped: the weights of the real keys sum to less than one. Packed attention gets
  it from SDPA by one extra key per sequence: queries gain a last channel holding ``sinks[h] / scale``, keys a last
  channel of 0, and the extra key is (0, ..., 0, 1) with a zero value, so its logit is exactly the sink and every
  other logit is unchanged; every query of a sequence sees it (a masked-in last column). Decoding appends the sink
  column to the scores (``kv_cache.KVCache.decode_attention``).
- **Sliding windows per layer.** ``config.layer_types`` alternates ``sliding_attention`` (the last
  ``sliding_window`` positions) and ``full_attention``; ``Transformer.layer_windows`` holds each layer's window.
- Biases on q/k/v/o (``nn.Linear`` biases, applied by ``apply_linear``), no q/k norms, and the rotary embedding's cos
  and sin come at half the head size (rotation of the two halves; YaRN's attention factor is already in them).
- **Experts.** ``gpt_oss_moe.py``: top-k of the biased router logits, then a softmax over those k; fused interleaved
  gate/up weights with biases; the clamped SwiGLU. LoRA on every expert's gate, up and down projections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.engine.gpt_oss_moe import freeze_experts, gpt_oss_block, gpt_oss_expert_targets, is_gpt_oss_block
from tinkerd.engine.lora import LoraRouting, apply_linear
from tinkerd.engine.transformer import AttentionFn, Transformer, _rms_norm, _rotate_half

MODEL_TYPE = "gpt_oss"


def is_gpt_oss_layer(layer: object) -> bool:
    """A decoder layer of the GPT-OSS layout: sinks on its attention [heads], and a GPT-OSS sparse block."""
    attn: Any = getattr(layer, "self_attn", None)
    sinks = getattr(attn, "sinks", None)
    return isinstance(sinks, torch.Tensor) and sinks.dim() == 1 and is_gpt_oss_block(getattr(layer, "mlp", None))


def layer_windows(config: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from ``config.layer_types``."""
    window = getattr(config, "sliding_window", None)
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * int(config.num_hidden_layers))
    return [int(window) if t == "sliding_attention" and window else None for t in types]


def _equal_length_runs(seq_lens: Sequence[int]) -> list[tuple[int, int, int]]:
    """(token offset, number of sequences, length) of runs of consecutive sequences of one length."""
    runs: list[tuple[int, int, int]] = []
    offset = 0
    for length in seq_lens:
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == offset:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, length)
        else:
            runs.append((offset, 1, length))
        offset += length
    return runs


def sink_attention(
    seq_lens: Sequence[int], scale: float, window: int | None, sinks_H: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Causal self-attention within each packed sequence (the last ``window`` positions when set) whose softmax also
    counts one sink logit per head; runs of equal length share one SDPA call."""
    runs = _equal_length_runs(seq_lens)
    masks: dict[int, torch.Tensor] = {}

    def mask_of(length: int, device: torch.device) -> torch.Tensor:
        """[T, T + 1]: True where query i may attend key j; the last column is the sink, seen by every query."""
        if length not in masks:
            i = torch.arange(length, device=device)
            allowed = i[None, :] <= i[:, None]
            if window is not None:
                allowed &= i[:, None] - i[None, :] < window
            masks[length] = torch.cat([allowed, allowed.new_ones(length, 1)], dim=1)
        return masks[length]

    def attend(q_N_H_D: torch.Tensor, k_N_G_D: torch.Tensor, v_N_G_D: torch.Tensor) -> torch.Tensor:
        n, heads, d = q_N_H_D.shape
        groups = k_N_G_D.shape[1]
        sink_q = (sinks_H.to(q_N_H_D.dtype) / scale)[None, :, None].expand(n, heads, 1)
        q1 = torch.cat([q_N_H_D, sink_q], dim=-1)  # [N, H, D + 1]
        k1 = F.pad(k_N_G_D, (0, 1))  # [N, G, D + 1], last channel 0
        v1 = F.pad(v_N_G_D, (0, 1))  # the same head size as q and k keeps SDPA on its fused kernel
        sink_k = k1.new_zeros(1, groups, 1, d + 1)
        sink_k[..., d] = 1.0
        outs: list[torch.Tensor] = []
        for start, count, length in runs:
            end = start + count * length
            # fresh copies: where a run starts in the packed batch must not change its result (a matmul's rounding
            # may depend on the alignment of its operands)
            q = q1[start:end].view(count, length, heads, d + 1).transpose(1, 2).contiguous()
            k = k1[start:end].view(count, length, groups, d + 1).transpose(1, 2)
            v = v1[start:end].view(count, length, groups, d + 1).transpose(1, 2)
            k = torch.cat([k, sink_k.expand(count, -1, -1, -1)], dim=2)  # [count, G, T + 1, D + 1]
            v = torch.cat([v, v.new_zeros(count, groups, 1, d + 1)], dim=2)
            mask = mask_of(length, q.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            outs.append(o[..., :d].transpose(1, 2).reshape(count * length, heads * d))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    return attend


class GptOssTransformer(Transformer):
    """A frozen GPT-OSS model run by the packed forward (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, compute_dtype: torch.dtype) -> None:
        super().__init__(hf_model, compute_dtype)
        for layer in self.layers:
            freeze_experts(layer.mlp, compute_dtype)
        self.expert_targets = gpt_oss_expert_targets(hf_model)
        self.sparse = [True] * len(self.layers)
        config: Any = hf_model.config
        self.layer_windows = layer_windows(config)
        # Attention takes these outside a layer's gather (``packed_attention`` builds before the pass; decoding), so
        # they are kept whole apart: a copy taken before the base may be sharded across ranks, which leaves a rank
        # 1/N of each layer's own ``sinks`` between gathers (engine/distributed/sharding.py). A few floats a layer.
        self.attention_sinks = [layer.self_attn.sinks.detach().float().clone() for layer in self.layers]

    def packed_attention(self, seq_lens: Sequence[int]) -> AttentionFn:
        assert self.attention_sinks is not None
        per_layer = [
            sink_attention(seq_lens, self.attn_scale, window, sinks)
            for window, sinks in zip(self.layer_windows, self.attention_sinks, strict=True)
        ]
        return lambda i, q, k, v: per_layer[i](q, k, v)

    def hidden(
        self,
        tokens_N: torch.Tensor,
        positions_N: torch.Tensor,
        routing: LoraRouting,
        attention: AttentionFn,
    ) -> torch.Tensor:
        s = self.shape
        shards = self.shards  # a sharded base: gather each unit around what reads it, as ``Transformer.hidden`` does
        if shards is not None:
            shards.gather_root()
        h = self.embed(tokens_N).to(self.act_dtype)
        if shards is not None:
            h = shards.residual(h)
        cos, sin = self.rotary(h[None], positions_N[None])  # [1, N, D / 2]: one angle per pair of halves
        cos_N_1_D = torch.cat([cos[0], cos[0]], dim=-1)[:, None, :]
        sin_N_1_D = torch.cat([sin[0], sin[0]], dim=-1)[:, None, :]
        n = tokens_N.shape[0]
        for i, layer in enumerate(self.layers):
            if shards is not None:
                h = shards.enter(i, h)
            attn = layer.self_attn
            prefix = f"model.layers.{i}"
            x = _rms_norm(layer.input_layernorm, h)
            q = apply_linear(attn.q_proj, f"{prefix}.self_attn.q_proj", x, routing).view(n, s.num_heads, s.head_dim)
            k = apply_linear(attn.k_proj, f"{prefix}.self_attn.k_proj", x, routing).view(n, s.num_kv_heads, -1)
            v = apply_linear(attn.v_proj, f"{prefix}.self_attn.v_proj", x, routing).view(n, s.num_kv_heads, -1)
            q = q * cos_N_1_D + _rotate_half(q) * sin_N_1_D
            k = k * cos_N_1_D + _rotate_half(k) * sin_N_1_D
            o = attention(i, q, k, v)
            h = h + apply_linear(attn.o_proj, f"{prefix}.self_attn.o_proj", o, routing)
            x = _rms_norm(layer.post_attention_layernorm, h)
            h = h + gpt_oss_block(layer.mlp, f"{prefix}.mlp", x, routing, self._trace)
            if shards is not None:
                h = shards.leave(i, h)
        return _rms_norm(self.norm, h)
