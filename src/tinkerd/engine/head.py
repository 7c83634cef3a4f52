"""Log-probabilities of chosen tokens under the unembedding, without materialising fp32 logits for autograd.

The vocabulary projection is the widest tensor in the model (tokens x vocab). Autograd through
``log_softmax(logits.float()).gather(...)`` keeps an fp32 copy of it and walks it three times in backward; this
function keeps only one fp32 copy of the logits (or recomputes them when that would be too large) and forms the gradient
``onehot - softmax`` in one pass per chunk. LoRA on the unembedding (Tinker's ``train_unembed``) enters as the
low-rank term ``u @ B.T`` with ``u = scale * h @ A.T`` computed by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tinkerd.engine.lora import rows_mm

CHUNK_TOKENS = 1024
SAVE_LOGITS_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class HeadSegment:
    """Rows [start, end) of the batch; ``lora`` indexes the (u, B) pair that applies to them, or -1 for none."""

    start: int
    end: int
    lora: int


def _chunks(segments: tuple[HeadSegment, ...]) -> list[HeadSegment]:
    out: list[HeadSegment] = []
    for seg in segments:
        for s in range(seg.start, seg.end, CHUNK_TOKENS):
            out.append(HeadSegment(s, min(seg.end, s + CHUNK_TOKENS), seg.lora))
    return out


class _TargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h_N_d: torch.Tensor,
        w_V_d: torch.Tensor,
        targets_N_K: torch.Tensor,
        segments: tuple[HeadSegment, ...],
        *lora_flat: torch.Tensor,
    ) -> torch.Tensor:
        # lora_flat = (u_0 [N, r0], b_0 [V, r0], u_1, b_1, ...); u_i has a row for every batch row (zeros outside).
        lora = [(lora_flat[i], lora_flat[i + 1]) for i in range(0, len(lora_flat), 2)]
        chunks = _chunks(segments)
        n, k = targets_N_K.shape
        out_N_K = torch.empty(n, k, dtype=torch.float32, device=h_N_d.device)
        lse_N = torch.empty(n, dtype=torch.float32, device=h_N_d.device)
        # Keep the logits for backward only when there will be one (forward-only scoring holds one chunk at a time).
        needs_grad = any(ctx.needs_input_grad)
        save_logits = needs_grad and n * w_V_d.shape[0] * 4 <= SAVE_LOGITS_MAX_BYTES
        saved: list[torch.Tensor] = []
        for c in chunks:
            logits32 = _chunk_logits(h_N_d, w_V_d, lora, c)
            lse = torch.logsumexp(logits32, dim=-1)
            lse_N[c.start : c.end] = lse
            out_N_K[c.start : c.end] = logits32.gather(1, targets_N_K[c.start : c.end]) - lse[:, None]
            if save_logits:
                saved.append(logits32)
        ctx.segments = segments
        ctx.save_logits = save_logits
        ctx.n_lora = len(lora)
        ctx.save_for_backward(h_N_d, w_V_d, targets_N_K, lse_N, *lora_flat, *saved)
        return out_N_K

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        g_N_K = grads[0].float()
        h_N_d, w_V_d, targets_N_K, lse_N, *rest = ctx.saved_tensors
        lora_flat = rest[: 2 * ctx.n_lora]
        saved = rest[2 * ctx.n_lora :]
        lora = [(lora_flat[i], lora_flat[i + 1]) for i in range(0, len(lora_flat), 2)]
        need_h = ctx.needs_input_grad[0]
        grad_h = torch.zeros_like(h_N_d) if need_h else None
        grad_lora: list[torch.Tensor | None] = []
        for i, (u, b) in enumerate(lora):
            grad_lora.append(torch.zeros_like(u) if ctx.needs_input_grad[4 + 2 * i] else None)
            grad_lora.append(torch.zeros_like(b) if ctx.needs_input_grad[5 + 2 * i] else None)
        for idx, c in enumerate(_chunks(ctx.segments)):
            logits = saved[idx] if ctx.save_logits else _chunk_logits(h_N_d, w_V_d, lora, c)
            g = g_N_K[c.start : c.end]
            # d logp_k / d logits = onehot(target_k) - softmax
            grad_logits = torch.exp(logits - lse_N[c.start : c.end, None]).mul_(-g.sum(dim=1, keepdim=True))
            grad_logits.scatter_add_(1, targets_N_K[c.start : c.end], g)
            if grad_h is not None:
                grad_h[c.start : c.end] = grad_logits.to(w_V_d.dtype) @ w_V_d
            if c.lora >= 0:
                u, b = lora[c.lora]
                gu, gb = grad_lora[2 * c.lora], grad_lora[2 * c.lora + 1]
                if gu is not None:
                    gu[c.start : c.end] = grad_logits.to(b.dtype) @ b
                if gb is not None:
                    gb += grad_logits.to(u.dtype).t() @ u[c.start : c.end]
        return (grad_h, None, None, None, *grad_lora)


def _chunk_logits(
    h_N_d: torch.Tensor, w_V_d: torch.Tensor, lora: list[tuple[torch.Tensor, torch.Tensor]], c: HeadSegment
) -> torch.Tensor:
    """fp32 logits of one chunk: the base product in the weight's dtype, widened, then the LoRA term added in fp32."""
    logits = rows_mm(h_N_d[c.start : c.end].to(w_V_d.dtype), w_V_d.t()).float()
    if c.lora >= 0:
        u, b = lora[c.lora]
        logits += rows_mm(u[c.start : c.end].float(), b.float().t())
    return logits


def chunked_logits(
    h_N_d: torch.Tensor,
    w_V_d: torch.Tensor,
    segments: tuple[HeadSegment, ...],
    lora: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """fp32 [N, V] logits computed exactly as ``target_logprobs`` computes them (no autograd)."""
    return torch.cat([_chunk_logits(h_N_d, w_V_d, lora, c) for c in _chunks(segments)])


def chunked_top_k(
    h_N_d: torch.Tensor,
    w_V_d: torch.Tensor,
    segments: tuple[HeadSegment, ...],
    lora: list[tuple[torch.Tensor, torch.Tensor]],
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens of every row and their fp32 logprobs ([N, k] each, most likely first), from
    the logits ``target_logprobs`` uses, one chunk at a time (never [N, V] at once; no autograd)."""
    values: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    with torch.no_grad():
        for c in _chunks(segments):
            logprobs = torch.log_softmax(_chunk_logits(h_N_d, w_V_d, lora, c), dim=-1)
            top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            values.append(top.values)
            ids.append(top.indices)
    return torch.cat(values), torch.cat(ids)


def target_logprobs(
    h_N_d: torch.Tensor,
    w_V_d: torch.Tensor,
    targets_N_K: torch.Tensor,
    segments: tuple[HeadSegment, ...],
    lora: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """fp32 log p(targets_N_K[n, k] | row n) for every row; differentiable in h and the LoRA factors.

    ``lora[i] = (u_N_r, b_V_r)``: u already holds ``scale * h @ A.T`` on the rows of segments using pair i.
    """
    flat: list[torch.Tensor] = [t for pair in lora for t in pair]
    out = _TargetLogprobs.apply(h_N_d, w_V_d, targets_N_K, segments, *flat)
    assert isinstance(out, torch.Tensor)
    return out
