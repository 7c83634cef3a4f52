"""The generic engine path: any causal LM transformers can load, run by its own forward with LoRA on its linear layers.

The packed forward (``transformer.py``) is fast but knows a few layouts. This path trades speed for coverage: each
adapter's sequences run as one right-padded batch through the Hugging Face model itself, and forward hooks on the
adapted ``nn.Linear`` modules add ``scale * (x @ A.T) @ B.T`` for the adapter of the current pass. Logprobs come from
the model's own logits (so soft-capping, biases, logit scales and the rest are whatever the model does).

Which linear layers a LoRA config trains is decided from module names alone (``module_role``), so checkpoints name
the same modules PEFT would: a layer under an ``attn``/``attention`` module is attention, the output embedding is the
unembedding, and the other linear layers of the decoder blocks are MLP. Mixture-of-experts routers are never adapted.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import ImageInput
from tinkerd.engine.lora import LoraRouting, LoraWeights
from tinkerd.engine.lora_targets import module_role
from tinkerd.engine.transformer import ModelShape
from tinkerd.engine.vision import ImageEncoder

Images = Sequence[ImageInput]  # the images of one sequence


def lora_candidates(model: nn.Module) -> list[str]:
    """Every linear layer some LoRA config could adapt, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_role(n) is not None]


def _shape_of(model: nn.Module) -> ModelShape:
    cfg: Any = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return ModelShape(
        num_layers=int(getattr(cfg, "num_hidden_layers", 1) or 1),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or max(1, hidden // heads)),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),  # type: ignore[union-attr]
        max_positions=int(positions),
        sliding_window=None,
    )


class GenericTransformer:
    """A frozen Hugging Face causal LM run by its own forward; LoRA enters through hooks. Holds no per-run state."""

    def __init__(self, hf_model: nn.Module, compute_dtype: torch.dtype, images: ImageEncoder | None = None) -> None:
        hf_model.requires_grad_(False)
        hf_model.eval()
        self.hf = hf_model.to(compute_dtype)
        self.dtype = compute_dtype
        self.act_dtype = compute_dtype  # what the Sampler's (unused, zero-position) KV slots are kept in
        self.shape = _shape_of(hf_model)
        self.device = next(hf_model.parameters()).device
        self.attn_scale = 1.0  # unused: attention is the model's own
        # fused MoE expert parameters this forward can adapt: none (its hooks reach nn.Linear layers only)
        self.expert_targets: dict[str, tuple[int, int, int]] = {}
        self._active: LoraWeights | None = None
        self.images = images  # a vision-language model's image path; None: text only
        modules = dict(hf_model.named_modules())
        for name in lora_candidates(hf_model):
            modules[name].register_forward_hook(self._lora_hook(name))
        # transformers 5 names a forward's cache argument ``cache``; models written before it, ``past_key_values``
        params = inspect.signature(hf_model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keeps_last_logits = "logits_to_keep" in params
        # Qwen-VL's multimodal rotary positions: the module that keeps the offsets its prefill computed
        self._rope_owner = next((m for m in hf_model.modules() if hasattr(m, "rope_deltas")), None)
        # whether ``prefill``/``decode`` are exact for every prompt: a vision-language model's positions after an image
        # are known only for the multimodal rotary layout above
        self.decodes_with_cache = images is None or self._rope_owner is not None

    def _lora_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            weights = self._active
            factors = weights.factors(name, torch.float32) if weights is not None else None
            if factors is None:
                return None
            assert weights is not None
            a_r_in, b_out_r = factors
            delta = (inputs[0].float() @ a_r_in.t()) @ (b_out_r.t() * weights.scale)  # the LoRA path in fp32
            return out + delta.to(out.dtype)

        return hook

    @contextmanager
    def _adapter(self, weights: LoraWeights | None) -> Iterator[None]:
        self._active = weights
        try:
            yield
        finally:
            self._active = None

    def padded_logits(
        self, seqs: Sequence[Sequence[int]], weights: LoraWeights | None, images: Sequence[Images] | None = None
    ) -> torch.Tensor:
        """fp32 logits [B, T, vocab] of right-padded sequences, all through one adapter (None: the base model);
        ``images[b]`` are the images in sequence b (a vision-language model)."""
        t = max(len(s) for s in seqs)
        tokens_B_T = torch.zeros(len(seqs), t, dtype=torch.long, device=self.device)
        mask_B_T = torch.zeros(len(seqs), t, dtype=torch.long, device=self.device)
        for i, seq in enumerate(seqs):
            tokens_B_T[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask_B_T[i, : len(seq)] = 1
        extra: dict[str, Any] = {}
        if images is not None and any(images):
            if self.images is None:
                raise InvalidRequestError("this model takes no images")
            tokens_B_T, extra = self.images.forward_inputs(tokens_B_T, images)
        with self._adapter(weights):
            out: Any = self.hf(input_ids=tokens_B_T, attention_mask=mask_B_T, use_cache=False, **extra)
        return out.logits.float()

    def prefill(
        self,
        seqs: Sequence[Sequence[int]],
        weights: LoraWeights | None,
        images: Sequence[Images] | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        """Sequences of one length (no padding ever enters a cache) through one adapter: their fp32 logits
        [B, T, vocab]; the model's own cache of them (its ``Cache`` object, whatever its layers hold: keys and values,
        a sliding window, a linear-attention layer's convolution and recurrent states), which ``decode`` continues;
        and for a multimodal-rotary model, each row's rotary offset [B] (what its positions run ahead of its token
        count after images; None for any other model). ``last_only``: the logits may be those of the last position
        alone ([B, 1, vocab], where the model can skip the rest)."""
        tokens_B_T = torch.tensor([list(s) for s in seqs], dtype=torch.long, device=self.device)
        mask_B_T = torch.ones_like(tokens_B_T)  # as ``padded_logits`` passes it, so the logits are the same
        extra: dict[str, Any] = {}
        if images is not None and any(images):
            if self.images is None:
                raise InvalidRequestError("this model takes no images")
            tokens_B_T, extra = self.images.forward_inputs(tokens_B_T, images)
        keep = {"logits_to_keep": 1} if last_only and self._keeps_last_logits else {}
        with self._adapter(weights):
            out: Any = self.hf(input_ids=tokens_B_T, attention_mask=mask_B_T, use_cache=True, **extra, **keep)
        cache = out.get(self._cache_arg)
        if cache is None:
            raise RuntimeError(f"{type(self.hf).__name__} returned no cache from a forward with use_cache=True")
        offsets_B = None
        if self._rope_owner is not None:
            # the model keeps the offsets of its last multimodal prefill on itself, shared by every later decode; they
            # are read here and passed back as explicit positions, so cohorts of other prompts can decode in between
            deltas: Any = self._rope_owner.rope_deltas
            offsets_B = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
            if extra and deltas is not None:
                offsets_B = deltas.reshape(-1).to(device=self.device, dtype=torch.long).expand(len(seqs)).clone()
        return out.logits.float(), cache, offsets_B

    def decode(
        self, tokens_B: torch.Tensor, weights: LoraWeights | None, cache: Any, positions_B: torch.Tensor | None = None
    ) -> torch.Tensor:
        """fp32 next-token logits [B, vocab] after appending ``tokens_B[b]`` to row b of ``cache`` (from ``prefill``,
        rows of one length), which advances in place; through one adapter. ``positions_B``: each token's rotary
        position, for a multimodal-rotary model (its text positions, the same on each of its three axes)."""
        extra: dict[str, Any] = {self._cache_arg: cache}
        if positions_B is not None:
            extra["position_ids"] = positions_B.view(1, -1, 1).expand(3, -1, 1)
        with self._adapter(weights):
            out: Any = self.hf(input_ids=tokens_B[:, None], use_cache=True, **extra)
        return out.logits[:, -1].float()

    def sequence_logprobs(
        self,
        seqs: Sequence[Sequence[int]],
        targets_N_K: torch.Tensor,
        routing: LoraRouting,
        images: Sequence[Images] | None = None,
    ) -> torch.Tensor:
        """fp32 [N, K] logprobs of targets for sequences packed back to back; differentiable into the adapters."""
        return self.sequence_logprobs_and_top_k(seqs, targets_N_K, routing, 0, images)[0]

    def sequence_logprobs_and_top_k(
        self,
        seqs: Sequence[Sequence[int]],
        targets_N_K: torch.Tensor,
        routing: LoraRouting,
        k: int,
        images: Sequence[Images] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``sequence_logprobs`` and, from the same pass, each position's ``k`` most likely tokens: (logprobs [N, K],
        top-k logprobs [N, k], their ids [N, k]; empty [N, 0] when k is 0); only the first is differentiable."""
        offsets = [0]
        for seq in seqs:
            offsets.append(offsets[-1] + len(seq))
        groups: dict[int, tuple[LoraWeights | None, list[int]]] = {}
        for i, start in enumerate(offsets[:-1]):
            weights = next(s.weights for s in routing.segments if s.start <= start < s.end)
            groups.setdefault(id(weights), (weights, []))[1].append(i)
        pieces: list[torch.Tensor | None] = [None] * len(seqs)
        tops: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
        for weights, members in groups.values():
            member_images = [images[i] for i in members] if images is not None else None
            logits_B_T_V = self.padded_logits([seqs[i] for i in members], weights, member_images)
            for b, i in enumerate(members):
                n = len(seqs[i])
                logprobs_T_V = F.log_softmax(logits_B_T_V[b, :n], dim=-1)
                pieces[i] = logprobs_T_V.gather(1, targets_N_K[offsets[i] : offsets[i] + n])
                top = logprobs_T_V.detach().topk(min(k, logprobs_T_V.shape[-1]), dim=-1)
                tops[i] = (top.values, top.indices)
        values = torch.cat([t[0] for t in tops if t is not None])
        ids = torch.cat([t[1] for t in tops if t is not None])
        return torch.cat([p for p in pieces if p is not None], dim=0), values, ids

    def last_logits(
        self,
        seqs: Sequence[Sequence[int]],
        weights: Sequence[LoraWeights | None],
        images: Sequence[Images] | None = None,
    ) -> torch.Tensor:
        """fp32 next-token logits [B, vocab] after each sequence, each through its own adapter."""
        out: list[torch.Tensor | None] = [None] * len(seqs)
        groups: dict[int, tuple[LoraWeights | None, list[int]]] = {}
        for i, w in enumerate(weights):
            groups.setdefault(id(w), (w, []))[1].append(i)
        for w, members in groups.values():
            member_images = [images[i] for i in members] if images is not None else None
            logits_B_T_V = self.padded_logits([seqs[i] for i in members], w, member_images)
            for b, i in enumerate(members):
                out[i] = logits_B_T_V[b, len(seqs[i]) - 1]
        return torch.stack([o for o in out if o is not None])
