# torch._foreach_* are public in practice (torch.optim is built on them) but torch does not re-export them.
# pyright: reportPrivateImportUsage=false
"""AdamW over one adapter's parameters, step for step the update ``torch.optim.AdamW`` makes (the Tinker SDK promises
exactly that optimizer), plus optional global-norm clipping like ``torch.nn.utils.clip_grad_norm_``.

The state is plain tensors so a checkpoint can store it: ``state_dict()`` gives ``step`` (int64 [P]) and
``exp_avg.{i}`` / ``exp_avg_sq.{i}`` for parameter i in the adapter's fixed parameter order. Steps are counted per
parameter because torch skips a parameter that has no gradient (its moments, its step and its weight decay all
stand still), and the bias correction of each parameter depends on its own count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import AdamParams

# clip_grad_norm_ adds this to the norm before dividing, so a zero gradient does not divide by zero.
_CLIP_EPS = 1e-6


@dataclass
class AdamState:
    """First and second moments per parameter and how many updates each parameter has had. Empty until first use."""

    steps: list[int] = field(default_factory=list)
    exp_avg: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)

    @property
    def step(self) -> int:
        """Optimizer steps that updated at least one parameter (every step updates all of a LoRA adapter)."""
        return max(self.steps, default=0)

    def is_empty(self) -> bool:
        return not self.exp_avg

    def init_for(self, params: Sequence[torch.Tensor]) -> None:
        self.steps = [0] * len(params)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]

    def check_matches(self, params: Sequence[torch.Tensor]) -> None:
        """Raise if this state belongs to a different set of parameters (say, a checkpoint of another adapter)."""
        if len(self.exp_avg) != len(params):
            raise InvalidRequestError(
                f"optimizer state holds {len(self.exp_avg)} tensors but the adapter has {len(params)} parameters"
            )
        for i, (moment, param) in enumerate(zip(self.exp_avg, params, strict=True)):
            if moment.shape != param.shape:
                raise InvalidRequestError(
                    f"optimizer state tensor {i} has shape {tuple(moment.shape)} but the adapter's parameter "
                    f"{i} has {tuple(param.shape)}"
                )

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"step": torch.tensor(self.steps, dtype=torch.int64)}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            tensors[f"exp_avg.{i}"] = m.detach().clone()
            tensors[f"exp_avg_sq.{i}"] = v.detach().clone()
        return tensors

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace this state with one ``state_dict`` produced; the tensors are copied."""
        if "step" not in tensors or tensors["step"].ndim != 1:
            raise InvalidRequestError("optimizer state lacks a 1-D 'step' tensor")
        steps = [int(s) for s in tensors["step"].tolist()]
        expected = {"step"} | {f"{name}.{i}" for i in range(len(steps)) for name in ("exp_avg", "exp_avg_sq")}
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)
            raise InvalidRequestError(f"optimizer state for {len(steps)} parameters has missing or extra keys {odd}")
        exp_avg = [tensors[f"exp_avg.{i}"].detach().clone() for i in range(len(steps))]
        exp_avg_sq = [tensors[f"exp_avg_sq.{i}"].detach().clone() for i in range(len(steps))]
        if any(m.shape != v.shape for m, v in zip(exp_avg, exp_avg_sq, strict=True)) or min(steps, default=0) < 0:
            raise InvalidRequestError("optimizer state is inconsistent: moment shapes differ or a step is negative")
        self.steps, self.exp_avg, self.exp_avg_sq = steps, exp_avg, exp_avg_sq


def check_adam_params(adam: AdamParams) -> None:
    """Reject hyperparameters AdamW cannot use (torch raises on the same ones)."""
    problems = []
    if not 0.0 <= adam.learning_rate < math.inf:
        problems.append(f"learning_rate must be >= 0, got {adam.learning_rate}")
    for name, beta in (("beta1", adam.beta1), ("beta2", adam.beta2)):
        if not 0.0 <= beta < 1.0:
            problems.append(f"{name} must be in [0, 1), got {beta}")
    if not 0.0 <= adam.eps < math.inf:
        problems.append(f"eps must be >= 0, got {adam.eps}")
    if not 0.0 <= adam.weight_decay < math.inf:
        problems.append(f"weight_decay must be >= 0, got {adam.weight_decay}")
    if not 0.0 <= adam.grad_clip_norm < math.inf:
        problems.append(f"grad_clip_norm must be >= 0 (0 means no clipping), got {adam.grad_clip_norm}")
    if problems:
        raise InvalidRequestError("invalid AdamParams: " + "; ".join(problems))


def global_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients as one vector, computed as clip_grad_norm_ does (a norm of per-tensor norms)."""
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(grads))))


@torch.no_grad()
def adamw_step(params: Sequence[torch.Tensor], state: AdamState, adam: AdamParams) -> dict[str, float]:
    """One AdamW update of ``params`` from their ``.grad``, then clear the gradients.

    Parameters whose ``.grad`` is None are left alone, as torch does. If the global gradient norm is not finite the
    whole update is skipped (weights and moments untouched) rather than writing nan into the adapter for good; the
    ``update_skipped`` metric says so. Returns ``grad_norm`` (before clipping), ``learning_rate``, ``update_skipped``.
    """
    check_adam_params(adam)
    if state.is_empty():
        state.init_for(params)
    state.check_matches(params)
    live = [i for i, p in enumerate(params) if p.grad is not None]
    grads = [g for g in (params[i].grad for i in live) if g is not None]  # the same list; narrows the type
    grad_norm = global_grad_norm(grads)
    skipped = not bool(torch.isfinite(grad_norm))
    if grads and not skipped:
        if adam.grad_clip_norm > 0:
            # clip_grad_norm_ multiplies by the clamped coefficient unconditionally; so do we, for identical bits.
            torch._foreach_mul_(grads, (adam.grad_clip_norm / (grad_norm + _CLIP_EPS)).clamp(max=1.0))
        _adamw_update([params[i] for i in live], grads, state, live, adam)
    for p in params:
        p.grad = None
    return {"grad_norm": float(grad_norm), "learning_rate": adam.learning_rate, "update_skipped": float(skipped)}


def _adamw_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], state: AdamState, indices: list[int], adam: AdamParams
) -> None:
    """torch's AdamW arithmetic, op for op (decoupled decay, lerp into m, bias-corrected sqrt(v) + eps)."""
    exp_avgs = [state.exp_avg[i] for i in indices]
    exp_avg_sqs = [state.exp_avg_sq[i] for i in indices]
    for i in indices:
        state.steps[i] += 1
    steps = [state.steps[i] for i in indices]
    lr, beta1, beta2 = adam.learning_rate, adam.beta1, adam.beta2

    if adam.weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * adam.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)

    step_sizes = [-(lr / (1 - beta1**step)) for step in steps]
    bias_correction2_sqrts = [(1 - beta2**step) ** 0.5 for step in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrts)
    torch._foreach_add_(denoms, adam.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
