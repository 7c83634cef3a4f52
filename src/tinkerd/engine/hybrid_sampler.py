"""The continuous-batching ``Sampler`` for a hybrid model (``qwen3_5.HybridTransformer``): its decode cache holds,
per slot, the keys and values of the full-attention layers and the convolution window and recurrent state of every
gated delta-net layer.

A prefill runs the packed forward with a recording ``PackedDeltaNet``, which keeps each prompt's last ``W - 1``
convolution inputs and final recurrent state per delta-net layer; stamping a sample copies them (with the prompt's
keys and values) into its slot; a decode step then advances each slot's window and state by one token
(``DecodeDeltaNet``) while attention reads the KV cache as for any other model. Admission, stamping, stopping, seeds,
prompt logprobs and rescoring are the ``Sampler``'s own, so cached decoding is checked against recomputing every
prefix, as for the dense layouts.

Memory: a slot's delta-net states are fixed-size (layers x heads x K x V floats, whatever the sequence length), on top
of the KV cache of the full-attention layers; both grow with the slots in use and are released when the cache empties.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tinkerd.engine.delta_net import DeltaNetShape, PackedDeltaNet, conv_step, recurrent_step
from tinkerd.engine.kv_cache import KVCache
from tinkerd.engine.lora import LoraRouting
from tinkerd.engine.qwen3_5 import HybridTransformer
from tinkerd.engine.sampler import MAX_PREFILL_TOKENS, Sampler
from tinkerd.engine.sampler_state import JobState, Row
from tinkerd.engine.sampling_validation import MAX_NUM_SAMPLES
from tinkerd.engine.transformer import AttentionFn, ModelShape, Transformer


class HybridCache(KVCache):
    """A ``KVCache`` of the full-attention layers that also keeps every delta-net layer's window and state per slot:
    ``conv_L_S_C_W1`` (the last W - 1 convolution inputs) and ``state_L_S_H_K_V`` (fp32 whatever the KV dtype)."""

    def __init__(
        self, kv_shape: ModelShape, delta: DeltaNetShape, dtype: torch.dtype, device: torch.device, max_slots: int
    ) -> None:
        self.delta = delta
        super().__init__(kv_shape, dtype, device, max_slots)

    def _empty(self) -> None:
        super()._empty()
        self.conv_L_S_C_W1, self.state_L_S_H_K_V = self._states(0)

    def _states(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.delta
        conv = torch.zeros((d.num_layers, slots, d.conv_channels, d.conv_window - 1), device=self.device)
        state = torch.zeros((d.num_layers, slots, d.num_heads, d.key_dim, d.value_dim), device=self.device)
        return conv, state

    def reserve(self, num_slots: int, num_positions: int) -> None:
        super().reserve(num_slots, num_positions)
        have = self.conv_L_S_C_W1.shape[1]
        if have < self.slot_capacity:  # the states follow the KV cache's slot capacity
            conv, state = self._states(self.slot_capacity)
            conv[:, :have] = self.conv_L_S_C_W1
            state[:, :have] = self.state_L_S_H_K_V
            self.conv_L_S_C_W1, self.state_L_S_H_K_V = conv, state

    def store_states(self, slots: Sequence[int], conv_L_C_W1: torch.Tensor, state_L_H_K_V: torch.Tensor) -> None:
        """Copy one prompt's delta-net windows and states into each of ``slots``."""
        self.reserve(max(slots) + 1, 0)
        slot_B = torch.tensor(list(slots), device=self.device)
        self.conv_L_S_C_W1[:, slot_B] = conv_L_C_W1[:, None].to(self.conv_L_S_C_W1.dtype)
        self.state_L_S_H_K_V[:, slot_B] = state_L_H_K_V[:, None].to(self.state_L_S_H_K_V.dtype)

    def decode_delta_net(self, slots: Sequence[int]) -> DecodeDeltaNet:
        """The delta-net mixer of one decode step: row i advances the window and state of ``slots[i]``."""
        self.reserve(max(slots) + 1, 0)
        return DecodeDeltaNet(self, torch.tensor(list(slots), device=self.device))


class DecodeDeltaNet:
    """One new token per row (the N rows are decode slots) against the window and state its slot holds, which it
    advances in place."""

    def __init__(self, cache: HybridCache, slot_N: torch.Tensor) -> None:
        self.cache = cache
        self.slot_N = slot_N

    def conv(self, layer: int, x_N_C: torch.Tensor, weight_C_W: torch.Tensor) -> torch.Tensor:
        windows_S_C_W1 = self.cache.conv_L_S_C_W1[layer]
        out_N_C, window_N_C_W1 = conv_step(windows_S_C_W1[self.slot_N], x_N_C, weight_C_W)
        windows_S_C_W1[self.slot_N] = window_N_C_W1
        return out_N_C

    def delta_rule(
        self,
        layer: int,
        q_N_H_K: torch.Tensor,
        k_N_H_K: torch.Tensor,
        v_N_H_V: torch.Tensor,
        g_N_H: torch.Tensor,
        beta_N_H: torch.Tensor,
    ) -> torch.Tensor:
        states_S_H_K_V = self.cache.state_L_S_H_K_V[layer]
        o_N_H_V, state_N_H_K_V = recurrent_step(states_S_H_K_V[self.slot_N], q_N_H_K, k_N_H_K, v_N_H_V, g_N_H, beta_N_H)
        states_S_H_K_V[self.slot_N] = state_N_H_K_V
        return o_N_H_V


class HybridSampler(Sampler):
    def __init__(
        self,
        transformer: HybridTransformer,
        decode_text: Callable[[list[int]], str] | None = None,
        max_batch: int = 64,
        max_num_samples: int = MAX_NUM_SAMPLES,
        max_prefill_tokens: int = MAX_PREFILL_TOKENS,
        scorer: Transformer | None = None,
    ) -> None:
        super().__init__(transformer, decode_text, max_batch, max_num_samples, max_prefill_tokens, scorer)
        self.hybrid = transformer
        self.hybrid_cache = HybridCache(
            transformer.kv_shape, transformer.delta_shape, transformer.act_dtype, transformer.device, max_batch
        )
        self.cache = self.hybrid_cache

    def _prefill_hidden(
        self,
        batch: list[JobState],
        tokens_N: torch.Tensor,
        positions_N: torch.Tensor,
        routing: LoraRouting,
        attend: AttentionFn,
    ) -> torch.Tensor:
        recorder = PackedDeltaNet([len(s.job.prompt) for s in batch], positions_N, record=True)
        h_N_d = self.hybrid.hidden(tokens_N, positions_N, routing, attend, recorder)
        conv_L_B_C_W1, state_L_B_H_K_V = torch.stack(recorder.conv_windows), torch.stack(recorder.states)
        for j, state in enumerate(batch):
            state.delta_net = (conv_L_B_C_W1[:, j], state_L_B_H_K_V[:, j])
        return h_N_d

    def _store_prompt(self, slots: list[int], state: JobState) -> None:
        super()._store_prompt(slots, state)
        assert state.delta_net is not None, "a hybrid prompt is prefilled by _prefill_hidden"
        self.hybrid_cache.store_states(slots, *state.delta_net)

    def _decode_hidden(
        self, rows: list[Row], tokens_B: torch.Tensor, positions_B: torch.Tensor, routing: LoraRouting
    ) -> torch.Tensor:
        t = self.hybrid
        slots = [r.slot for r in rows]
        attend = self.cache.decode_attention(slots, [r.position for r in rows], t.attn_scale)
        return t.hidden(tokens_B, positions_B, routing, attend, self.hybrid_cache.decode_delta_net(slots))
