"""One forward implementation for training, scoring and sampling: a decoder-only transformer over packed tokens.

The weights are a Hugging Face causal LM's (Llama, Mistral, Qwen2, Qwen3 layouts, and the Qwen3-MoE / Qwen2-MoE
mixture-of-experts layouts, whose sparse MLP blocks run in ``moe.py``); the forward is ours so that
(a) tokens of many sequences are packed into one [N, hidden] matrix with no padding, so every linear layer runs one
large matmul, (b) each token can route through a different LoRA adapter, and (c) attention is pluggable: causal
within each sequence for training, against a KV cache for decoding. Parity with the Hugging Face forward is tested.

Precision: only the frozen base matmuls (and the embedding lookup) run in the compute dtype (bf16 by default, ~5x
faster on this CPU). Everything an update can move by a tiny amount stays fp32: the residual stream, norms, rotary
angles, attention, the LoRA factors and deltas, and the logits. A bf16 residual or a LoRA delta added onto a bf16
base output rounds small updates away (the default configuration then learned 2-5x less per step than fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.engine.head import HeadSegment, chunked_logits, chunked_top_k, target_logprobs
from tinkerd.engine.lora import MIN_INVARIANT_ROWS, LoraRouting, LoraWeights, Segment, apply_linear, rows_mm
from tinkerd.engine.moe import RouterTrace, expert_targets, is_sparse_block, sparse_block

# attention(layer_index, q_N_H_D, k_N_Hkv_D, v_N_Hkv_D) -> o_N_HD
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BaseShards(Protocol):
    """The frozen base sharded across a trainer's ranks (engine/distributed/sharding.py): the forward gathers a
    unit's weights before it reads them and releases them after. Every packed body (``hidden`` here, in ``gpt_oss.py``
    and in ``qwen3_5.py``) calls ``gather_root`` first, ``residual`` on the embedding's output, and ``enter(i)`` /
    ``leave(i)`` around decoder layer i, which reads its own weights only in between."""

    def gather_root(self) -> None: ...

    def residual(self, h_N_d: torch.Tensor) -> torch.Tensor: ...

    def enter(self, i: int, h_N_d: torch.Tensor) -> torch.Tensor: ...

    def leave(self, i: int, h_N_d: torch.Tensor) -> torch.Tensor: ...

    def one_pass(self) -> AbstractContextManager[None]: ...

    def idle_pass(self, grad: bool) -> None: ...


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    sliding_window: int | None


def _shape_of(model: nn.Module) -> ModelShape:
    cfg: Any = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    return ModelShape(
        num_layers=int(cfg.num_hidden_layers),
        hidden_size=int(cfg.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(cfg.vocab_size),
        max_positions=int(getattr(cfg, "max_position_embeddings", 1 << 30)),
        sliding_window=int(window) if window else None,
    )


def causal_attention(
    seq_lens: Sequence[int], scale: float, window: int | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Causal self-attention within each packed sequence; runs of equal length share one SDPA call."""
    runs: list[tuple[int, int, int]] = []  # (token offset, number of sequences, length)
    offset = 0
    for length in seq_lens:
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == offset:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, length)
        else:
            runs.append((offset, 1, length))
        offset += length

    def attend(q_N_H_D: torch.Tensor, k_N_G_D: torch.Tensor, v_N_G_D: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for start, count, length in runs:
            end = start + count * length
            q = q_N_H_D[start:end].view(count, length, *q_N_H_D.shape[1:]).transpose(1, 2)
            k = k_N_G_D[start:end].view(count, length, *k_N_G_D.shape[1:]).transpose(1, 2)
            v = v_N_G_D[start:end].view(count, length, *v_N_G_D.shape[1:]).transpose(1, 2)
            if window is not None and length > window:
                i = torch.arange(length, device=q.device)
                mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            outs.append(o.transpose(1, 2).reshape(count * length, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    return attend


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm as one fused op (the Hugging Face module spends six passes on it)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Transformer:
    """A frozen Hugging Face causal LM, run by our packed forward. Holds no per-run state."""

    def __init__(self, hf_model: nn.Module, compute_dtype: torch.dtype) -> None:
        hf_model.requires_grad_(False)
        hf_model.eval()
        # Only the big frozen matrices (linear layers, the embedding) take the compute dtype; norms and the rotary
        # frequencies stay fp32 (a bf16 inverse frequency turns position 500 by a visibly wrong angle).
        for module in hf_model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.to(compute_dtype)
        # fused MoE experts are frozen base matmuls too; their routers stay fp32 (see moe.py)
        self.expert_targets = expert_targets(hf_model)
        for layer in getattr(getattr(hf_model, "model", None), "layers", []):
            if is_sparse_block(layer.mlp):
                layer.mlp.experts.to(compute_dtype)
        self.hf = hf_model
        # dtype of the frozen base matmuls; activations, the residual stream and LoRA deltas are always fp32
        self.dtype = compute_dtype
        self.act_dtype = torch.float32
        self.shape = _shape_of(hf_model)
        # Hugging Face modules are typed loosely (nn.Module.__getattr__); we read their known attributes as Any.
        hf: Any = hf_model
        self.embed: nn.Embedding = hf.model.embed_tokens
        self.layers: list[Any] = list(hf.model.layers)
        self.norm: nn.Module = hf.model.norm
        self.rotary: nn.Module = hf.model.rotary_emb
        self.lm_head: nn.Linear = hf.lm_head
        # (a hybrid model's first layers may be linear attention: the scale is its first attention layer's)
        self.attn_scale = float(next(x.self_attn for x in self.layers if hasattr(x, "self_attn")).scaling)
        self.device = self.embed.weight.device
        self.sparse = [is_sparse_block(layer.mlp) for layer in self.layers]
        self._trace: RouterTrace | None = None
        # per layer: its sliding window (None: full attention) and, for GPT-OSS, its attention-sink logits [heads]
        self.layer_windows: list[int | None] = [self.shape.sliding_window] * self.shape.num_layers
        self.attention_sinks: list[torch.Tensor] | None = None
        # set when the base is sharded across a trainer's ranks (FSDP2); None: every weight is here, whole
        self.shards: BaseShards | None = None

    @contextmanager
    def tracing_router(self) -> Iterator[RouterTrace]:
        """Record what the MoE routers choose in the forwards run inside (for load-balancing metrics)."""
        self._trace = RouterTrace()
        try:
            yield self._trace
        finally:
            self._trace = None

    # -- the body ---------------------------------------------------------------------------------------------------

    def hidden(
        self,
        tokens_N: torch.Tensor,
        positions_N: torch.Tensor,
        routing: LoraRouting,
        attention: AttentionFn,
    ) -> torch.Tensor:
        """Final-norm hidden states [N, hidden] for packed tokens at the given positions."""
        s = self.shape
        shards = self.shards
        if shards is not None:
            shards.gather_root()
        # The residual stream stays fp32: each layer's (and each adapter's) contribution is added without rounding.
        h = self.embed(tokens_N).to(self.act_dtype)
        if shards is not None:
            h = shards.residual(h)
        cos, sin = self.rotary(h[None], positions_N[None])
        cos_N_1_D, sin_N_1_D = cos[0][:, None, :], sin[0][:, None, :]
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
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before the rotation
                q, k = _rms_norm(attn.q_norm, q), _rms_norm(attn.k_norm, k)
            q = q * cos_N_1_D + _rotate_half(q) * sin_N_1_D
            k = k * cos_N_1_D + _rotate_half(k) * sin_N_1_D
            o = attention(i, q, k, v)
            h = h + apply_linear(attn.o_proj, f"{prefix}.self_attn.o_proj", o, routing)
            h = h + self.mlp(i, _rms_norm(layer.post_attention_layernorm, h), routing)
            if shards is not None:
                h = shards.leave(i, h)
        return _rms_norm(self.norm, h)

    def mlp(self, i: int, x_N_d: torch.Tensor, routing: LoraRouting) -> torch.Tensor:
        """Layer i's MLP (its mixture of experts, or the dense gated MLP) on its normalised input."""
        mlp = self.layers[i].mlp
        prefix = f"model.layers.{i}.mlp"
        if self.sparse[i]:
            return sparse_block(mlp, prefix, x_N_d, routing, self._trace)
        gate = apply_linear(mlp.gate_proj, f"{prefix}.gate_proj", x_N_d, routing)
        up = apply_linear(mlp.up_proj, f"{prefix}.up_proj", x_N_d, routing)
        return apply_linear(mlp.down_proj, f"{prefix}.down_proj", mlp.act_fn(gate) * up, routing)

    def packed_hidden(self, seqs: Sequence[Sequence[int]], routing: LoraRouting) -> torch.Tensor:
        """Hidden states of whole sequences packed back to back (causal attention within each).

        Batch-invariant: a sequence's rows are bit-identical whatever else is packed with it (too few tokens for
        that are padded with a dummy base-model sequence, see ``MIN_INVARIANT_ROWS``)."""
        lens = [len(t) for t in seqs]
        flat = [t for seq in seqs for t in seq]
        n = len(flat)
        if n < MIN_INVARIANT_ROWS:
            lens.append(MIN_INVARIANT_ROWS - n)
            flat += [0] * (MIN_INVARIANT_ROWS - n)
            routing = LoraRouting((*routing.segments, Segment(n, MIN_INVARIANT_ROWS, None)))
        tokens = torch.tensor(flat, dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(length, device=self.device) for length in lens])
        return self.hidden(tokens, positions, routing, self.packed_attention(lens))[:n]

    def packed_attention(self, seq_lens: Sequence[int]) -> AttentionFn:
        """Every layer's causal attention within each of the sequences packed back to back."""
        attend = causal_attention(seq_lens, self.attn_scale, self.shape.sliding_window)
        return lambda _i, q, k, v: attend(q, k, v)

    # -- the head ---------------------------------------------------------------------------------------------------

    def _head_lora(self, h_N_d: torch.Tensor, routing: LoraRouting) -> tuple[tuple[HeadSegment, ...], list]:
        segments: list[HeadSegment] = []
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        n = h_N_d.shape[0]
        for seg in routing.segments:
            factors = seg.weights.factors("lm_head", h_N_d.dtype) if seg.weights is not None else None
            if factors is None:
                segments.append(HeadSegment(seg.start, seg.end, -1))
                continue
            a, b = factors
            assert seg.weights is not None
            u = rows_mm(h_N_d[seg.start : seg.end], a.t()) * seg.weights.scale
            u_full = F.pad(u, (0, 0, seg.start, n - seg.end))
            segments.append(HeadSegment(seg.start, seg.end, len(pairs)))
            pairs.append((u_full, b))
        return tuple(segments), pairs

    def target_logprobs(self, h_N_d: torch.Tensor, targets_N_K: torch.Tensor, routing: LoraRouting) -> torch.Tensor:
        """fp32 [N, K] logprobs of targets; differentiable into the adapters."""
        segments, pairs = self._head_lora(h_N_d, routing)
        return target_logprobs(h_N_d, self.lm_head.weight, targets_N_K, segments, pairs)

    def scoring_logits(self, h_N_d: torch.Tensor, routing: LoraRouting) -> torch.Tensor:
        """Full fp32 logits [N, vocab] with the numerics of ``target_logprobs`` (for rescoring samples)."""
        segments, pairs = self._head_lora(h_N_d, routing)
        return chunked_logits(h_N_d, self.lm_head.weight, segments, pairs)

    def sequence_logprobs(
        self, seqs: Sequence[Sequence[int]], targets_N_K: torch.Tensor, routing: LoraRouting
    ) -> torch.Tensor:
        """fp32 [N, K] logprobs of targets for whole sequences packed back to back; differentiable into adapters."""
        return self.target_logprobs(self.packed_hidden(seqs, routing), targets_N_K, routing)

    def sequence_logprobs_and_top_k(
        self, seqs: Sequence[Sequence[int]], targets_N_K: torch.Tensor, routing: LoraRouting, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sequence_logprobs`` in the same pass as each position's ``k`` most likely tokens: (logprobs [N, K],
        top-k logprobs [N, k], their token ids [N, k]); only the first is differentiable."""
        h_N_d = self.packed_hidden(seqs, routing)
        logprobs_N_K = self.target_logprobs(h_N_d, targets_N_K, routing)
        with torch.no_grad():
            segments, pairs = self._head_lora(h_N_d.detach(), routing)
            values_N_k, ids_N_k = chunked_top_k(h_N_d.detach(), self.lm_head.weight, segments, pairs, k)
        return logprobs_N_K, values_N_k, ids_N_k

    def logits(self, h_N_d: torch.Tensor, routing: LoraRouting) -> torch.Tensor:
        """Full fp32 logits [N, vocab]; for sampling and prompt top-k, never under autograd."""
        out = apply_linear(self.lm_head, "lm_head", h_N_d, routing)
        return out.float()


def merged_weights_delta(weights: LoraWeights, name: str) -> torch.Tensor:
    """scale * B @ A: what merging the adapter adds to a base weight (for export and tests)."""
    return (weights.b[name] @ weights.a[name]) * weights.scale
