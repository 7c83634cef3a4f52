"""Gated delta-net (Qwen3.5's linear attention) over packed sequences, restarting at every sequence boundary.

A gated delta-net layer mixes tokens twice: a causal depthwise convolution over the last ``W`` inputs of q, k and v
(``conv``), then the gated delta rule, a linear-attention recurrence that keeps per sequence and head a state
S [K, V]: for each token t, S <- exp(g_t) S; S <- S + k_t (beta_t (v_t - S^T k_t))^T; the output is S^T q_t (q and k
L2-normalised, q also scaled by K^-1/2). Both restart at each packed sequence's first token.

Training and prefill run the rule chunked, as transformers' reference implementation (and the FLA kernels) do: within
a chunk of ``CHUNK`` positions the updates are one triangular solve, and only the chunk-to-chunk recurrence runs in
order. Every sequence starts at a chunk boundary and its last chunk is padded with no-op positions (g = 0, beta = 0,
k = v = 0), so a sequence's result does not depend on what is packed beside it; the chunks of all sequences are
computed together, and each step of the recurrence advances every sequence that still has a chunk. Decoding
continues one token at a time from the states a prefill recorded (``conv_step``, ``recurrent_step``).

Letters: C convolution channels (q, k, v of all heads side by side), W the convolution window, H value heads (query
and key heads repeated to match), K key head size, V value head size, M chunks of all sequences. Everything here is
fp32.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

CHUNK = 64
_L2_EPS = 1e-6  # transformers' l2norm (and FLA's)


@dataclass(frozen=True)
class DeltaNetShape:
    """The delta-net layers of a model: how many, and the sizes of the states decoding keeps for each sequence."""

    num_layers: int
    conv_channels: int
    conv_window: int
    num_heads: int  # value heads
    key_dim: int
    value_dim: int


class DeltaNetMixer(Protocol):
    """What mixes tokens in delta-net layer ``layer`` (its index among delta-net layers): a packed pass or a decode
    step against cached states."""

    def conv(self, layer: int, x_N_C: torch.Tensor, weight_C_W: torch.Tensor) -> torch.Tensor:
        """The causal depthwise convolution (before its activation)."""
        ...

    def delta_rule(
        self,
        layer: int,
        q_N_H_K: torch.Tensor,
        k_N_H_K: torch.Tensor,
        v_N_H_V: torch.Tensor,
        g_N_H: torch.Tensor,
        beta_N_H: torch.Tensor,
    ) -> torch.Tensor:
        """The gated delta rule's output [N, H, V] for normalised q and k (see ``normalised_qk``)."""
        ...


def normalised_qk(q_N_Hk_K: torch.Tensor, k_N_Hk_K: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k L2-normalised per head (q also scaled by K^-1/2), each key head repeated for its value heads."""
    q = q_N_Hk_K * torch.rsqrt((q_N_Hk_K * q_N_Hk_K).sum(-1, keepdim=True) + _L2_EPS)
    k = k_N_Hk_K * torch.rsqrt((k_N_Hk_K * k_N_Hk_K).sum(-1, keepdim=True) + _L2_EPS)
    q = q * q.shape[-1] ** -0.5
    repeat = num_heads // q.shape[1]
    if repeat > 1:
        q, k = q.repeat_interleave(repeat, dim=1), k.repeat_interleave(repeat, dim=1)
    return q, k


def packed_conv(x_N_C: torch.Tensor, weight_C_W: torch.Tensor, positions_N: torch.Tensor) -> torch.Tensor:
    """Causal depthwise convolution within each packed sequence: a token sees the inputs of the ``W - 1`` tokens
    before it in its own sequence (``positions_N`` is each token's position in it) and zeros before the start."""
    n, w = x_N_C.shape[0], weight_C_W.shape[1]
    out_N_C = x_N_C * weight_C_W[:, w - 1]
    for s in range(1, w):
        earlier_N_C = F.pad(x_N_C, (0, 0, s, 0))[:n]  # the input s tokens back
        out_N_C = out_N_C + torch.where((positions_N >= s)[:, None], earlier_N_C, 0.0) * weight_C_W[:, w - 1 - s]
    return out_N_C


def conv_step(
    window_B_C_W1: torch.Tensor, x_B_C: torch.Tensor, weight_C_W: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token per row after its last ``W - 1`` inputs: (the convolution's output [B, C], the new window)."""
    full_B_C_W = torch.cat([window_B_C_W1, x_B_C[:, :, None]], dim=-1)
    return (full_B_C_W * weight_C_W).sum(-1), full_B_C_W[:, :, 1:]


def recurrent_step(
    state_B_H_K_V: torch.Tensor,
    q_B_H_K: torch.Tensor,
    k_B_H_K: torch.Tensor,
    v_B_H_V: torch.Tensor,
    g_B_H: torch.Tensor,
    beta_B_H: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule for one token per row: (its output [B, H, V], the new state)."""
    state = state_B_H_K_V * g_B_H.exp()[..., None, None]
    remembered_B_H_V = (k_B_H_K[:, :, None, :] @ state)[:, :, 0]
    delta_B_H_V = (v_B_H_V - remembered_B_H_V) * beta_B_H[..., None]
    state = state + k_B_H_K[..., None] * delta_B_H_V[:, :, None, :]
    return (q_B_H_K[:, :, None, :] @ state)[:, :, 0], state


class ChunkLayout:
    """Where each packed token sits when every sequence is cut into chunks of ``CHUNK`` positions (sequence b's
    chunks are numbered consecutively), and which chunks each step of the chunk-to-chunk recurrence runs."""

    def __init__(self, seq_lens: Sequence[int], device: torch.device) -> None:
        counts = [-(-length // CHUNK) for length in seq_lens]
        firsts = list(itertools.accumulate(counts, initial=0))[:-1]
        self.num_chunks = m = sum(counts)
        n = sum(seq_lens)
        # packed row -> its place among the M * CHUNK chunk positions, and back (padding reads row n: zeros)
        lens_B = torch.tensor(list(seq_lens), dtype=torch.long, device=device)
        seq_N = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens_B)
        position_N = torch.arange(n, device=device) - (torch.cumsum(lens_B, 0) - lens_B)[seq_N]
        first_B = torch.tensor(firsts, dtype=torch.long, device=device)
        self.place_N = first_B[seq_N] * CHUNK + position_N
        self.row_MC = torch.full((m * CHUNK,), n, dtype=torch.long, device=device)
        self.row_MC[self.place_N] = torch.arange(n, device=device)
        # step s runs chunk s of every sequence that has one: (those sequences, or None for all; their chunks)
        self.steps: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        order: list[int] = []
        for s in range(max(counts, default=0)):
            active = [b for b, c in enumerate(counts) if c > s]
            ids = [firsts[b] + s for b in active]
            every = len(active) == len(counts)
            self.steps.append(
                (None if every else torch.tensor(active, device=device), torch.tensor(ids, device=device))
            )
            order += ids
        # the steps' outputs concatenated -> chunk order
        self.unsteps_M = torch.argsort(torch.tensor(order, dtype=torch.long, device=device))

    def chunks(self, x_N_: torch.Tensor) -> torch.Tensor:
        """Packed [N, ...] as [M, CHUNK, ...], zeros where a sequence's last chunk is padded."""
        padded = torch.cat([x_N_, x_N_.new_zeros(1, *x_N_.shape[1:])])[self.row_MC]
        return padded.view(self.num_chunks, CHUNK, *x_N_.shape[1:])


def chunked_delta_rule(
    q_N_H_K: torch.Tensor,
    k_N_H_K: torch.Tensor,
    v_N_H_V: torch.Tensor,
    g_N_H: torch.Tensor,
    beta_N_H: torch.Tensor,
    layout: ChunkLayout,
    num_seqs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over packed sequences from zero states: (output [N, H, V], each sequence's final state
    [B, H, K, V])."""
    q, k, v = (layout.chunks(x).transpose(1, 2) for x in (q_N_H_K, k_N_H_K, v_N_H_V))  # [M, H, CHUNK, *]
    g, beta = (layout.chunks(x).transpose(1, 2) for x in (g_N_H, beta_N_H))  # [M, H, CHUNK]
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    log_decay = g.cumsum(-1)  # from the chunk's start to each position
    later = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay_M_H_C_C = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(later, -torch.inf).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay_M_H_C_C
    within_M_H_C_C = (q @ k.transpose(-1, -2)) * decay_M_H_C_C
    # the chunk's updates solved at once (the UT transform): the values it writes, and the keys that read the
    # state it starts from
    new_v = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    decay_M_H_C = log_decay.exp()
    k_read = torch.linalg.solve_triangular(system, k_beta * decay_M_H_C[..., None], upper=False, unitriangular=True)
    q_read = q * decay_M_H_C[..., None]
    k_write = (k * (log_decay[..., -1:] - log_decay).exp()[..., None]).transpose(-1, -2)
    chunk_decay = decay_M_H_C[..., -1, None, None]  # [M, H, 1, 1]
    h, vd = q.shape[1], v.shape[-1]
    state = q.new_zeros(num_seqs, h, q.shape[-1], vd)
    outs: list[torch.Tensor] = []
    for active, ids in layout.steps:
        start = state if active is None else state[active]
        v_step = new_v[ids] - k_read[ids] @ start
        outs.append(q_read[ids] @ start + within_M_H_C_C[ids] @ v_step)
        end = start * chunk_decay[ids] + k_write[ids] @ v_step
        state = end if active is None else state.index_put((active,), end)
    o_M_H_C_V = torch.cat(outs)[layout.unsteps_M]
    o_N_H_V = o_M_H_C_V.transpose(1, 2).reshape(-1, h, vd)[layout.place_N]
    return o_N_H_V, state


def seq_lens_of(positions_N: torch.Tensor) -> list[int]:
    """The lengths of packed sequences whose positions each start at 0."""
    starts = torch.nonzero(positions_N == 0).flatten().tolist()
    return [end - start for start, end in zip(starts, [*starts[1:], positions_N.shape[0]], strict=True)]


class PackedDeltaNet:
    """Delta-net mixing over whole packed sequences from empty states (training, scoring and prefill); with
    ``record``, it keeps each layer's final states per sequence for decoding to continue from."""

    def __init__(self, seq_lens: Sequence[int], positions_N: torch.Tensor, record: bool = False) -> None:
        self.positions_N = positions_N
        self.seq_lens = list(seq_lens)
        self.layout = ChunkLayout(seq_lens, positions_N.device)
        self.record = record
        self.conv_windows: list[torch.Tensor] = []  # per layer: [B, C, W - 1], each sequence's last inputs
        self.states: list[torch.Tensor] = []  # per layer: [B, H, K, V]
        ends = torch.cumsum(torch.tensor(self.seq_lens, device=positions_N.device), 0)
        self._ends_B = ends

    def conv(self, layer: int, x_N_C: torch.Tensor, weight_C_W: torch.Tensor) -> torch.Tensor:
        if self.record:
            assert layer == len(self.conv_windows), "layers must run in order"
            back = torch.arange(weight_C_W.shape[1] - 1, 0, -1, device=x_N_C.device)  # W-1 .. 1 tokens before the end
            rows_B_W1 = self._ends_B[:, None] - back[None, :]
            starts_B = self._ends_B - torch.tensor(self.seq_lens, device=x_N_C.device)
            inside = rows_B_W1 >= starts_B[:, None]  # before a short prompt's start the window holds zeros
            padded = torch.cat([x_N_C, x_N_C.new_zeros(1, x_N_C.shape[1])])
            rows = torch.where(inside, rows_B_W1, x_N_C.shape[0])
            self.conv_windows.append(padded[rows].transpose(1, 2).contiguous())
        return packed_conv(x_N_C, weight_C_W, self.positions_N)

    def delta_rule(
        self,
        layer: int,
        q_N_H_K: torch.Tensor,
        k_N_H_K: torch.Tensor,
        v_N_H_V: torch.Tensor,
        g_N_H: torch.Tensor,
        beta_N_H: torch.Tensor,
    ) -> torch.Tensor:
        o_N_H_V, final_B_H_K_V = chunked_delta_rule(
            q_N_H_K, k_N_H_K, v_N_H_V, g_N_H, beta_N_H, self.layout, len(self.seq_lens)
        )
        if self.record:
            self.states.append(final_B_H_K_V)
        return o_N_H_V
