"""LoRA adapters that many runs share over one frozen base model.

An adapter is a set of (A, B) pairs keyed by the base module's dotted name, exactly as PEFT names them
(``model.layers.0.self_attn.q_proj``), so checkpoints map one to one onto PEFT files. The delta a module adds is
``scale * (x @ A.T) @ B.T`` with ``scale = alpha / rank``; B starts at zero so a fresh adapter equals the base.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import MAX_LORA_RANK, LoraConfig
from tinkerd.engine.lora_targets import enabled_roles, module_role

MAX_RANK = MAX_LORA_RANK


def target_module_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """The dotted names of the base linear layers this config trains, in model order (see ``lora_targets``)."""
    roles = enabled_roles(config)
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module_role(name) in roles
    ]


def validate_lora_config(config: LoraConfig) -> None:
    if not 1 <= config.rank <= MAX_RANK:
        raise InvalidRequestError(f"lora rank must be between 1 and {MAX_RANK}, got {config.rank}")
    if not (config.train_attn or config.train_mlp or config.train_unembed):
        raise InvalidRequestError("LoRA config trains nothing: enable train_attn, train_mlp or train_unembed")
    if not math.isfinite(config.alpha) or config.alpha <= 0:
        raise InvalidRequestError(f"lora alpha must be a positive number, got {config.alpha}")


@dataclass
class LoraWeights:
    """One adapter's weights. ``a[name]`` is [rank, in_features], ``b[name]`` is [out_features, rank], fp32."""

    rank: int
    alpha: float
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    # per-compute-dtype casts of frozen weights (a sampler version never changes, so its casts can be kept)
    _cast_cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )
    frozen: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> Iterator[torch.Tensor]:
        for name in self.a:
            yield self.a[name]
            yield self.b[name]

    def factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) for a module in the compute dtype; differentiable for trainable adapters."""
        a = self.a.get(name)
        if a is None:
            return None
        b = self.b[name]
        if a.dtype == dtype:
            return a, b
        if not self.frozen:
            return a.to(dtype), b.to(dtype)
        key = (name, dtype)
        cached = self._cast_cache.get(key)
        if cached is None:
            cached = (a.to(dtype), b.to(dtype))
            self._cast_cache[key] = cached
        return cached

    def scaled_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [r, in], scale * B.T [r, out]) in the compute dtype: the delta is then one addmm onto the base output."""
        factors = self.factors(name, dtype)
        if factors is None:
            return None
        a, b = factors
        if not self.frozen:
            return a, (b * self.scale).t().contiguous()  # the same layout as a frozen copy's: the same kernel
        key = (name + "#scaled", dtype)
        cached = self._cast_cache.get(key)
        if cached is None:
            cached = (a, (b * self.scale).t().contiguous())
            self._cast_cache[key] = cached
        return cached

    def expert_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For the experts of a sparse block (``moe.py``): (A [E, r, in], scale * B transposed [E, r, out]), fp32."""
        a = self.a.get(name)
        if a is None:
            return None
        key = (name + "#experts", torch.float32)
        cached = self._cast_cache.get(key) if self.frozen else None
        if cached is None:
            cached = (a, (self.b[name] * self.scale).transpose(1, 2).contiguous())
            if self.frozen:
                self._cast_cache[key] = cached
        return cached

    def snapshot(self) -> LoraWeights:
        """An immutable copy: what a sampler version serves, whatever training does next."""
        return LoraWeights(
            rank=self.rank,
            alpha=self.alpha,
            a={k: v.detach().clone() for k, v in self.a.items()},
            b={k: v.detach().clone() for k, v in self.b.items()},
            frozen=True,
        )

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())


def init_lora_weights(
    model: nn.Module,
    config: LoraConfig,
    device: torch.device,
    experts: Mapping[str, tuple[int, int, int]] | None = None,
) -> LoraWeights:
    """Fresh trainable weights: A ~ kaiming-uniform (as PEFT does), B = 0, so the adapter starts as the base model.

    ``experts`` (name -> (experts, in, out), see ``moe.expert_targets``) are the expert projections of sparse blocks
    the forward can adapt; with ``train_mlp`` each expert gets its own rank-r adapter: A [E, r, in], B [E, out, r]."""
    validate_lora_config(config)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(config.seed if config.seed is not None else torch.seed() % (2**63))
    modules = dict(model.named_modules())
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    names = target_module_names(model, config)
    expert_names = [n for n in (experts or {}) if module_role(n) in enabled_roles(config)]
    if not names and not expert_names:
        kind = type(model).__name__
        raise InvalidRequestError(f"this LoRA config adapts no layer of {kind}; enable another of attn, mlp, unembed")
    for name in names:
        linear = modules[name]
        assert isinstance(linear, nn.Linear)
        bound = 1.0 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)) reduces to this bound
        a_r_in = (torch.rand(config.rank, linear.in_features, generator=generator) * 2 - 1) * bound
        a[name] = a_r_in.to(device).requires_grad_(True)
        b[name] = torch.zeros(linear.out_features, config.rank, device=device, requires_grad=True)
    for name in expert_names:
        count, in_features, out_features = (experts or {})[name]
        bound = 1.0 / math.sqrt(in_features)
        a_E_r_in = (torch.rand(count, config.rank, in_features, generator=generator) * 2 - 1) * bound
        a[name] = a_E_r_in.to(device).requires_grad_(True)
        b[name] = torch.zeros(count, out_features, config.rank, device=device, requires_grad=True)
    return LoraWeights(rank=config.rank, alpha=config.alpha, a=a, b=b)


# MKL's fp32 matmul takes another summation order for fewer than 12 rows (except 4 and 8), so a row's result would
# depend on how many rows share its product; below this many rows, products are padded with zero rows.
MIN_INVARIANT_ROWS = 12


def pad_rows(x_n_k: torch.Tensor) -> torch.Tensor:
    """``x`` with zero rows appended up to ``MIN_INVARIANT_ROWS`` (callers slice the first n rows of the result)."""
    n = x_n_k.shape[0]
    return x_n_k if n >= MIN_INVARIANT_ROWS else torch.nn.functional.pad(x_n_k, (0, 0, 0, MIN_INVARIANT_ROWS - n))


def rows_mm(x_n_k: torch.Tensor, w_k_m: torch.Tensor) -> torch.Tensor:
    """``x @ w`` whose every row is bit-identical however many rows ``x`` has (batch-invariant)."""
    n = x_n_k.shape[0]
    return (pad_rows(x_n_k) @ w_k_m)[:n]


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of a packed token batch use ``weights`` (None: the bare base model)."""

    start: int
    end: int
    weights: LoraWeights | None


@dataclass(frozen=True)
class LoraRouting:
    """Which adapter each token of a packed batch runs through: contiguous segments covering all tokens."""

    segments: tuple[Segment, ...]

    @staticmethod
    def single(num_tokens: int, weights: LoraWeights | None) -> LoraRouting:
        return LoraRouting((Segment(0, num_tokens, weights),))

    def is_base_only(self) -> bool:
        return all(s.weights is None for s in self.segments)


def apply_linear(linear: nn.Linear, name: str, x_N_in: torch.Tensor, routing: LoraRouting) -> torch.Tensor:
    """``linear(x)`` plus each segment's LoRA delta for module ``name``, in the dtype of ``x``.

    The frozen base runs in its weight's dtype (bf16 by default) and its output is widened to ``x``'s dtype (fp32)
    before the adapter's delta is added: a bf16 sum would round a small delta onto the bf16 grid of the base output
    and swallow it (a delta under half a unit in the last place never changes the sum). The delta itself is computed
    in fp32 from the fp32 input and the fp32 factors, so the adapter path keeps full precision end to end.
    """
    base_dtype = linear.weight.dtype
    out_N_out = linear(x_N_in.to(base_dtype)).to(x_N_in.dtype)
    if routing.is_base_only():
        return out_N_out
    pieces: list[torch.Tensor] = []
    touched = False
    for seg in routing.segments:
        factors = seg.weights.scaled_factors(name, x_N_in.dtype) if seg.weights is not None else None
        if factors is None:
            pieces.append(out_N_out[seg.start : seg.end])
            continue
        touched = True
        a_r_in, b_scaled_r_out = factors
        delta_n_out = rows_mm(rows_mm(x_N_in[seg.start : seg.end], a_r_in.t()), b_scaled_r_out)
        if len(routing.segments) == 1:
            return out_N_out + delta_n_out
        pieces.append(out_N_out[seg.start : seg.end] + delta_n_out)
    return torch.cat(pieces, dim=0) if touched else out_N_out
