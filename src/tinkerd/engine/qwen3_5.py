"""Qwen3.5 on the packed forward: gated delta-net layers between full-attention layers (``qwen3_5_text``, and
``qwen3_5_moe_text``, whose MLPs are sparse blocks with a shared expert, run by ``moe.py``).

What differs from the dense layouts of ``transformer.py``:

- ``config.layer_types`` names each layer "linear_attention" (``linear_attn``, a gated delta-net, see
  ``delta_net.py``) or "full_attention" (``self_attn``).
- Every RMSNorm of the decoder (the layers', the final one, attention's q and k norms) is zero-centred: it multiplies
  by ``1 + weight``.
- Full attention: ``q_proj`` emits, per head, the query followed by an output gate of the same size; the attention
  output is multiplied by ``sigmoid(gate)`` before ``o_proj``; the rotation turns only the first
  ``partial_rotary_factor`` of each head (Qwen3.5's multimodal rotary, whose three position axes are equal for text).
- Delta-net: ``in_proj_qkv`` -> causal convolution -> SiLU -> q, k, v; ``in_proj_b`` -> beta = sigmoid(b);
  ``in_proj_a`` -> decay g = -exp(A_log) * softplus(a + dt_bias); the rule's output [H, V] goes through a gated
  RMSNorm (``norm``: plain weight, times silu(``in_proj_z``(x))) and ``out_proj``.

LoRA adapts the linear layers the generic path adapts: q/k/v/o_proj and the delta-net's in_proj_qkv, in_proj_z,
in_proj_b, in_proj_a and out_proj (attention), the MLP or the shared expert and every expert (MLP), lm_head.

Attention functions see only the full-attention layers, numbered among themselves, so a KV cache of ``kv_shape``
holds exactly those; the delta-net layers' convolution windows and states belong to the ``DeltaNetMixer`` a caller
passes (``hybrid_sampler.py`` keeps them per decode slot), else to a packed pass over whole sequences.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.engine.delta_net import DeltaNetMixer, DeltaNetShape, PackedDeltaNet, normalised_qk, seq_lens_of
from tinkerd.engine.lora import LoraRouting, apply_linear
from tinkerd.engine.moe import is_sparse_block
from tinkerd.engine.transformer import AttentionFn, Transformer

FULL, LINEAR = "full_attention", "linear_attention"
_DELTA_NET_LINEARS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def is_hybrid(hf_model: nn.Module) -> bool:
    """Whether a model's config mixes linear-attention layers into its decoder (``layer_types``)."""
    types = getattr(getattr(hf_model, "config", None), "layer_types", None)
    return isinstance(types, list) and LINEAR in types


def _linears(module: object, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _is_delta_net(net: Any) -> bool:
    conv = getattr(net, "conv1d", None)
    params = all(isinstance(getattr(net, p, None), torch.Tensor) for p in ("A_log", "dt_bias"))
    norm_weight = getattr(getattr(net, "norm", None), "weight", None)
    return (
        _linears(net, _DELTA_NET_LINEARS)
        and isinstance(conv, nn.Conv1d)
        and conv.bias is None
        and conv.groups == conv.in_channels == conv.out_channels
        and params
        and isinstance(norm_weight, torch.Tensor)
        and getattr(net, "activation", None) in ("silu", "swish")
    )


def _is_gated_attention(attn: Any) -> bool:
    if not _linears(attn, ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    # the query and its output gate, per head: twice what o_proj reads
    gated = attn.q_proj.out_features == 2 * attn.o_proj.in_features
    return gated and all(hasattr(attn, n) for n in ("q_norm", "k_norm"))


def hybrid_layout_ok(hf_model: nn.Module) -> bool:
    """Whether the loaded modules are the layout this forward reads, layer by layer as ``layer_types`` says."""
    m: Any = hf_model
    body: Any = getattr(m, "model", None)
    if not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    if not isinstance(getattr(m, "lm_head", None), nn.Linear):
        return False
    types = list(m.config.layer_types)
    if len(types) != len(body.layers) or not set(types) <= {FULL, LINEAR} or FULL not in types:
        return False
    for kind, layer in zip(types, body.layers, strict=True):
        if kind == LINEAR:
            mixer_ok = _is_delta_net(getattr(layer, "linear_attn", None))
        else:
            mixer_ok = _is_gated_attention(getattr(layer, "self_attn", None))
        mlp = getattr(layer, "mlp", None)
        if not (mixer_ok and (_linears(mlp, _MLP) or is_sparse_block(mlp))):
            return False
    return True


def _norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """Qwen3.5's zero-centred RMSNorm: scales by ``1 + weight``."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight + 1.0, norm.eps)


def _partial_rotary(x_N_H_D: torch.Tensor, cos_N_1_R: torch.Tensor, sin_N_1_R: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (as the dense layouts rotate all of them); the rest pass unchanged."""
    r = cos_N_1_R.shape[-1]
    turned, kept = x_N_H_D[..., :r], x_N_H_D[..., r:]
    first, second = turned.chunk(2, dim=-1)
    rotated = turned * cos_N_1_R + torch.cat((-second, first), dim=-1) * sin_N_1_R
    return torch.cat((rotated, kept), dim=-1)


class HybridTransformer(Transformer):
    """A frozen Qwen3.5 causal LM run by the packed forward. Holds no per-run state."""

    def __init__(self, hf_model: nn.Module, compute_dtype: torch.dtype) -> None:
        super().__init__(hf_model, compute_dtype)
        cfg: Any = hf_model.config
        self.layer_types: list[str] = list(cfg.layer_types)
        full = [i for i, kind in enumerate(self.layer_types) if kind == FULL]
        linear = [i for i, kind in enumerate(self.layer_types) if kind == LINEAR]
        # a layer's index among the layers of its kind: what attention functions and delta-net mixers are told
        self.kind_index = {i: j for j, i in enumerate(full)} | {i: j for j, i in enumerate(linear)}
        self.kv_shape = replace(self.shape, num_layers=len(full))
        net: Any = self.layers[linear[0]].linear_attn if linear else None
        self.key_heads = int(cfg.linear_num_key_heads)
        self.delta_shape = DeltaNetShape(
            num_layers=len(linear),
            conv_channels=int(net.conv1d.weight.shape[0]) if net is not None else 0,
            conv_window=int(net.conv1d.weight.shape[2]) if net is not None else 1,
            num_heads=int(cfg.linear_num_value_heads),
            key_dim=int(cfg.linear_key_head_dim),
            value_dim=int(cfg.linear_value_head_dim),
        )

    def hidden(
        self,
        tokens_N: torch.Tensor,
        positions_N: torch.Tensor,
        routing: LoraRouting,
        attention: AttentionFn,
        delta_net: DeltaNetMixer | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [N, hidden]. Without ``delta_net``, the tokens are whole sequences packed back to
        back (each starting at position 0) and the delta-net layers run over each from an empty state."""
        shards = self.shards  # a sharded base: gather each unit around what reads it, as ``Transformer.hidden`` does
        if shards is not None:
            shards.gather_root()
        h = self.embed(tokens_N).to(self.act_dtype)  # the residual stream stays fp32, as in ``Transformer``
        if shards is not None:
            h = shards.residual(h)
        cos, sin = self.rotary(h[None], positions_N[None])
        cos_sin = (cos[0][:, None, :], sin[0][:, None, :])
        mixer = delta_net if delta_net is not None else PackedDeltaNet(seq_lens_of(positions_N), positions_N)
        for i, layer in enumerate(self.layers):
            if shards is not None:
                h = shards.enter(i, h)
            prefix = f"model.layers.{i}"
            x = _norm(layer.input_layernorm, h)
            j = self.kind_index[i]
            if self.layer_types[i] == LINEAR:
                h = h + self._delta_net(layer.linear_attn, f"{prefix}.linear_attn", x, routing, mixer, j)
            else:
                h = h + self._attention(layer.self_attn, f"{prefix}.self_attn", x, routing, cos_sin, attention, j)
            h = h + self.mlp(i, _norm(layer.post_attention_layernorm, h), routing)
            if shards is not None:
                h = shards.leave(i, h)
        return _norm(self.norm, h)

    def _attention(
        self,
        attn: Any,
        prefix: str,
        x_N_d: torch.Tensor,
        routing: LoraRouting,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionFn,
        j: int,
    ) -> torch.Tensor:
        s, n = self.shape, x_N_d.shape[0]
        q_gate = apply_linear(attn.q_proj, f"{prefix}.q_proj", x_N_d, routing).view(n, s.num_heads, 2 * s.head_dim)
        q, gate_N_H_D = q_gate[..., : s.head_dim], q_gate[..., s.head_dim :]
        k = apply_linear(attn.k_proj, f"{prefix}.k_proj", x_N_d, routing).view(n, s.num_kv_heads, s.head_dim)
        v = apply_linear(attn.v_proj, f"{prefix}.v_proj", x_N_d, routing).view(n, s.num_kv_heads, s.head_dim)
        q = _partial_rotary(_norm(attn.q_norm, q), *cos_sin)
        k = _partial_rotary(_norm(attn.k_norm, k), *cos_sin)
        o_N_HD = attention(j, q, k, v) * torch.sigmoid(gate_N_H_D.reshape(n, -1))
        return apply_linear(attn.o_proj, f"{prefix}.o_proj", o_N_HD, routing)

    def _delta_net(
        self, net: Any, prefix: str, x_N_d: torch.Tensor, routing: LoraRouting, mixer: DeltaNetMixer, j: int
    ) -> torch.Tensor:
        d, n = self.delta_shape, x_N_d.shape[0]
        qkv_N_C = apply_linear(net.in_proj_qkv, f"{prefix}.in_proj_qkv", x_N_d, routing)
        z_N_H_V = apply_linear(net.in_proj_z, f"{prefix}.in_proj_z", x_N_d, routing).view(n, d.num_heads, -1)
        b_N_H = apply_linear(net.in_proj_b, f"{prefix}.in_proj_b", x_N_d, routing)
        a_N_H = apply_linear(net.in_proj_a, f"{prefix}.in_proj_a", x_N_d, routing)
        qkv_N_C = F.silu(mixer.conv(j, qkv_N_C, net.conv1d.weight[:, 0, :]))
        keys = self.key_heads * d.key_dim
        q, k, v = qkv_N_C.split([keys, keys, d.num_heads * d.value_dim], dim=-1)
        q, k = normalised_qk(q.reshape(n, -1, d.key_dim), k.reshape(n, -1, d.key_dim), d.num_heads)
        # in fp64, then rounded: on a row of few heads, vectorised and scalar softplus/sigmoid differ in the last bit,
        # which would make a token's result depend on where its row falls in the batch (not batch-invariant)
        g_N_H = (-net.A_log.double().exp() * F.softplus(a_N_H.double() + net.dt_bias.double())).float()
        beta_N_H = torch.sigmoid(b_N_H.double()).float()
        o_N_H_V = mixer.delta_rule(j, q, k, v.reshape(n, d.num_heads, d.value_dim), g_N_H, beta_N_H)
        o_N_H_V = F.rms_norm(o_N_H_V, (d.value_dim,), net.norm.weight, net.norm.variance_epsilon) * F.silu(z_N_H_V)
        return apply_linear(net.out_proj, f"{prefix}.out_proj", o_N_H_V.reshape(n, -1), routing)
