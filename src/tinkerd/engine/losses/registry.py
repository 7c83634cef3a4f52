"""The built-in losses by name: which inputs and config each takes, validation, and the per-datum adapters.

Sources (facts, not code): tinker-docs.thinkingmachines.ai/tinker/losses/{cross-entropy,ppo,cispo,dro,gspo,
stable-reinforce} and tinker/datum ("Provenance"); the tinker-cookbook 0.6.1 tutorial 202 (clip thresholds default to
0.8 and 1.2), recipes/rl_loop.py (gspo's ``sequence_ratio_mask``, stable_reinforce's provenance) and rl/train.py
(stable_reinforce "only accepts nonzero advantages on sampled tokens"); the tinker SDK 0.38 ``Datum`` (which types
``clip_low_threshold`` / ``clip_high_threshold`` as per-token loss_fn_inputs, so a datum may carry its own bounds) and
its proto (stable_reinforce's ``loss_fn_config`` example ``{"kl_coeff": 0.01}``). The Baseten Loops SDK 0.32
(``TrainingClient.forward_backward``'s docstring) gives ``dpo``'s and ``dppo``'s config keys and defaults and DPO's
pairing (even datums chosen, odd rejected; ``helpers/datum.py``: ``ref_logprobs`` aligned with ``target_tokens``);
``dppo``'s names and defaults are those of PRIME-RL's default loss (DPPO-Binary TV, arXiv 2602.04879, plus a squared
log-ratio KL term), whose formula ``kernels.dppo`` follows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.engine.losses import kernels
from tinkerd.engine.losses.metrics import drift_metrics
from tinkerd.engine.losses.types import LossInputs, LossOutput

CLIP_LOW_DEFAULT = 0.8
CLIP_HIGH_DEFAULT = 1.2
# The docs give no default for DRO's beta, only the example value 0.05; we use that.
DRO_BETA_DEFAULT = 0.05
# stable_reinforce's importance-weight cap. Tinker does not publish its objective; 2.0 is the usual cap for
# truncated importance sampling in RL on LLMs.
STABLE_REINFORCE_TRUNCATION = 2.0
# Its one documented setting; off unless asked for (the docs show no default, only the example value 0.01).
STABLE_REINFORCE_KL_COEFF_DEFAULT = 0.0
DPO_CONFIG = {"beta": 0.1, "label_smoothing": 0.0}
DPPO_CONFIG = {"dppo_mask_high": 0.2, "dppo_mask_low": 0.2, "adv_tau": 1.0, "kl_tau": 1e-3}

_CLIP_CONFIG = {"clip_low_threshold": CLIP_LOW_DEFAULT, "clip_high_threshold": CLIP_HIGH_DEFAULT}
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")
_RL_INPUTS = ("target_tokens", "logprobs", "advantages")


@dataclass(frozen=True)
class LossSpec:
    required: tuple[str, ...]  # loss_fn_inputs a datum must carry
    optional: tuple[str, ...] = ()  # loss_fn_inputs the loss reads when present
    config: Mapping[str, float] = field(default_factory=dict)  # the accepted loss_fn_config keys and defaults
    soft_targets: bool = False  # accepts (T, K) target_tokens
    needs_provenance: bool = False  # every datum must carry provenance, with nonzero advantages on sampled tokens only
    paired: bool = False  # datums come in (chosen, rejected) pairs, even index chosen; the loss is per pair


SPECS: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(required=("target_tokens", "weights"), soft_targets=True),
    "importance_sampling": LossSpec(required=_RL_INPUTS),
    "ppo": LossSpec(required=_RL_INPUTS, optional=_CLIP_INPUTS, config=_CLIP_CONFIG),
    "cispo": LossSpec(required=_RL_INPUTS, optional=_CLIP_INPUTS, config=_CLIP_CONFIG),
    "dro": LossSpec(required=_RL_INPUTS, config={"beta": DRO_BETA_DEFAULT}),
    "gspo": LossSpec(required=_RL_INPUTS, optional=(*_CLIP_INPUTS, "sequence_ratio_mask"), config=_CLIP_CONFIG),
    "stable_reinforce": LossSpec(
        required=_RL_INPUTS, config={"kl_coeff": STABLE_REINFORCE_KL_COEFF_DEFAULT}, needs_provenance=True
    ),
    "dppo": LossSpec(required=_RL_INPUTS, optional=("weights",), config=DPPO_CONFIG),
    "dpo": LossSpec(required=("target_tokens", "weights", "ref_logprobs"), config=DPO_CONFIG, paired=True),
}


def _spec(name: str) -> LossSpec:
    spec = SPECS.get(name)
    if spec is None:
        raise InvalidRequestError(f"unknown loss_fn {name!r}; built-in losses are: {', '.join(SPECS)}")
    return spec


def is_paired(name: str) -> bool:
    """Whether loss ``name`` scores (chosen, rejected) pairs of datums rather than each datum alone."""
    return _spec(name).paired


def required_inputs(name: str) -> tuple[str, ...]:
    """The loss_fn_inputs every datum must carry for loss ``name``."""
    return _spec(name).required


def resolve_config(name: str, config: Mapping[str, object]) -> dict[str, float]:
    """The request's loss_fn_config checked against what loss ``name`` accepts, with defaults filled in."""
    spec = _spec(name)
    unknown = sorted(set(config) - set(spec.config))
    if unknown:
        accepted = ", ".join(spec.config) or "no keys"
        raise InvalidRequestError(f"loss_fn {name!r} does not take loss_fn_config {unknown}; it accepts {accepted}")
    resolved = dict(spec.config)
    for key, value in config.items():
        # bool is an int subclass; True as a threshold is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be a finite number, got {value!r}")
        resolved[key] = float(value)
    low, high = resolved.get("clip_low_threshold"), resolved.get("clip_high_threshold")
    if low is not None and high is not None and not 0.0 <= low <= high:
        raise InvalidRequestError(
            f"loss_fn_config needs 0 <= clip_low_threshold <= clip_high_threshold, got {low} and {high} "
            "(they bound the ratio p/q itself, e.g. 0.8 and 1.2)"
        )
    for key in ("beta", "kl_coeff", *DPPO_CONFIG):
        if resolved.get(key, 0.0) < 0.0:
            raise InvalidRequestError(f"loss_fn_config[{key!r}] must be >= 0, got {resolved[key]}")
    if not 0.0 <= resolved.get("label_smoothing", 0.0) <= 0.5:
        raise InvalidRequestError(
            f"loss_fn_config['label_smoothing'] must be between 0 and 0.5, got {resolved['label_smoothing']}"
        )
    return resolved


def check_inputs(name: str, inputs: Mapping[str, torch.Tensor]) -> None:
    """Check a datum's loss_fn_inputs for loss ``name`` before any model runs: presence, dtypes, shapes, finiteness.

    Every input must have one row per position (``target_tokens``' leading dimension); the ones the loss reads
    must match ``target_tokens`` exactly, except that RL losses take (T,) inputs only.
    """
    spec = _spec(name)
    missing = [key for key in spec.required if key not in inputs]
    if missing:
        raise InvalidRequestError(
            f"loss_fn {name!r} needs loss_fn_inputs {list(spec.required)}; this datum lacks {missing}"
        )
    targets = inputs["target_tokens"]
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise InvalidRequestError(f"loss_fn_inputs['target_tokens'] must hold integers, got {targets.dtype}")
    allowed_ndim = (1, 2) if spec.soft_targets else (1,)
    if targets.ndim not in allowed_ndim:
        shapes = "(N,) or (N, K)" if spec.soft_targets else "(N,)"
        raise InvalidRequestError(f"loss_fn {name!r} takes target_tokens of shape {shapes}, got {tuple(targets.shape)}")
    num_positions = targets.shape[0]
    read = set(spec.required) | set(spec.optional)
    for key, tensor in inputs.items():
        if tensor.ndim == 0 or tensor.shape[0] != num_positions:
            raise InvalidRequestError(
                f"loss_fn_inputs[{key!r}] has shape {tuple(tensor.shape)} but the datum has {num_positions} "
                f"positions (target_tokens {tuple(targets.shape)}); every input needs one row per position"
            )
        if key == "target_tokens" or key not in read:
            continue
        if tensor.shape != targets.shape:
            raise InvalidRequestError(
                f"loss_fn_inputs[{key!r}] has shape {tuple(tensor.shape)}; loss_fn {name!r} needs it to match "
                f"target_tokens {tuple(targets.shape)}"
            )
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise InvalidRequestError(f"loss_fn_inputs[{key!r}] contains nan or inf")
    _check_per_token_clip(inputs)


def _check_per_token_clip(inputs: Mapping[str, torch.Tensor]) -> None:
    low, high = inputs.get("clip_low_threshold"), inputs.get("clip_high_threshold")
    if low is not None and bool((low < 0).any()):
        raise InvalidRequestError("loss_fn_inputs['clip_low_threshold'] must be >= 0 at every position")
    if low is not None and high is not None and bool((low > high).any()):
        raise InvalidRequestError("loss_fn_inputs['clip_low_threshold'] exceeds 'clip_high_threshold' at some position")


def _check_logprobs(name: str, x: LossInputs) -> None:
    targets = x.inputs["target_tokens"]
    if not x.logprobs.dtype.is_floating_point or x.logprobs.shape != targets.shape:
        raise InvalidRequestError(
            f"loss_fn {name!r} got logprobs {tuple(x.logprobs.shape)} {x.logprobs.dtype} for target_tokens "
            f"{tuple(targets.shape)}; they must be floating point and the same shape"
        )


def check_provenance_use(name: str, x: LossInputs) -> None:
    """A loss that needs provenance gets it on the datum, and advantages only where a sampler made the token."""
    num_positions = x.inputs["target_tokens"].shape[0]
    if x.sampled is not None and tuple(x.sampled.shape) != (num_positions,):
        raise InvalidRequestError(
            f"the datum's loss_fn_input_spans cover {tuple(x.sampled.shape)} positions; target_tokens has "
            f"{num_positions}"
        )
    if not _spec(name).needs_provenance:
        return
    if x.sampled is None:
        raise InvalidRequestError(
            f"loss_fn {name!r} needs provenance on every datum: sample with record_stability_info=True and attach "
            "each sampled sequence's sequence_id with Datum.with_provenance(...); this datum has no spans"
        )
    stray = (x.inputs["advantages"] != 0) & ~x.sampled
    if bool(stray.any()):
        first = int(torch.nonzero(stray)[0, 0])
        raise InvalidRequestError(
            f"loss_fn {name!r} takes nonzero advantages on sampled tokens only; position {first} has advantage "
            f"{float(x.inputs['advantages'][first])} but no SampledProvenanceSpan covers it"
        )


def checked(name: str, x: LossInputs) -> LossInputs:
    """One datum's inputs for loss ``name`` validated, with its config resolved; user mistakes raise
    InvalidRequestError."""
    config = resolve_config(name, x.config)
    check_inputs(name, x.inputs)
    _check_logprobs(name, x)
    check_provenance_use(name, x)
    return LossInputs(logprobs=x.logprobs, inputs=x.inputs, config=config, sampled=x.sampled)


def compute_loss(name: str, x: LossInputs) -> LossOutput:
    """Validate one datum's request for loss ``name`` and compute its loss (a paired loss: ``preference``)."""
    if _spec(name).paired:
        raise ValueError(f"loss {name!r} scores pairs of datums: use preference.compute_pair_loss")
    return LOSSES[name](checked(name, x))


# ---- adapters: LossInputs -> kernel -> LossOutput. They assume validated inputs; compute_loss validates. ----


def _float_input(x: LossInputs, key: str) -> torch.Tensor:
    """An input as the logprobs' dtype and device, so the loss is computed at the logprobs' precision."""
    return x.inputs[key].to(dtype=x.logprobs.dtype, device=x.logprobs.device)


def _threshold(x: LossInputs, key: str, default: float) -> kernels.Threshold:
    """A per-token input of that name wins over loss_fn_config, which wins over the default."""
    if key in x.inputs:
        return _float_input(x, key)
    return float(x.config.get(key, default))


def _clip_bounds(x: LossInputs) -> tuple[kernels.Threshold, kernels.Threshold]:
    return (
        _threshold(x, "clip_low_threshold", CLIP_LOW_DEFAULT),
        _threshold(x, "clip_high_threshold", CLIP_HIGH_DEFAULT),
    )


def _output(x: LossInputs, elementwise: torch.Tensor) -> LossOutput:
    loss = elementwise.sum()
    return LossOutput(
        loss=loss,
        outputs={"logprobs": x.logprobs.detach(), "elementwise_loss": elementwise.detach()},
        metrics={"loss:sum": float(loss.detach())},
    )


def _rl_output(x: LossInputs, elementwise: torch.Tensor) -> LossOutput:
    """An RL loss's output, with how far the sampler's logprobs (the datum's) are from ours on the scored tokens."""
    out = _output(x, elementwise)
    out.metrics.update(drift_metrics(x.logprobs, _float_input(x, "logprobs"), _scored_tokens(x)))
    return out


def _scored_tokens(x: LossInputs) -> torch.Tensor:
    """The tokens whose sampler logprobs mean something: the sampled ones when provenance says, else those with a
    nonzero advantage (the cookbook gives prompt tokens advantage 0 and logprob 0)."""
    if x.sampled is not None:
        return x.sampled.to(x.logprobs.device)
    return (x.inputs["advantages"] != 0).to(x.logprobs.device)


def _cross_entropy(x: LossInputs) -> LossOutput:
    return _output(x, kernels.cross_entropy(x.logprobs, _float_input(x, "weights")))


def _importance_sampling(x: LossInputs) -> LossOutput:
    q, adv = _float_input(x, "logprobs"), _float_input(x, "advantages")
    return _rl_output(x, kernels.importance_sampling(x.logprobs, q, adv))


def _ppo(x: LossInputs) -> LossOutput:
    q, adv = _float_input(x, "logprobs"), _float_input(x, "advantages")
    return _rl_output(x, kernels.ppo(x.logprobs, q, adv, *_clip_bounds(x)))


def _cispo(x: LossInputs) -> LossOutput:
    q, adv = _float_input(x, "logprobs"), _float_input(x, "advantages")
    return _rl_output(x, kernels.cispo(x.logprobs, x.logprobs.detach(), q, adv, *_clip_bounds(x)))


def _dro(x: LossInputs) -> LossOutput:
    q, adv = _float_input(x, "logprobs"), _float_input(x, "advantages")
    beta = float(x.config.get("beta", DRO_BETA_DEFAULT))
    return _rl_output(x, kernels.dro(x.logprobs, q, adv, beta))


def _sequence_ratio_mask(x: LossInputs) -> torch.Tensor:
    """The tokens GSPO's sequence ratio averages over: ``sequence_ratio_mask`` when given; else the sampled tokens
    (the docs define the ratio over "a sequence's sampled tokens"), known from the datum's provenance, or failing
    that the tokens with a nonzero advantage (the cookbook's RL data gives advantages to sampled tokens only)."""
    if "sequence_ratio_mask" in x.inputs:
        return x.inputs["sequence_ratio_mask"]
    if x.sampled is not None:
        return x.sampled
    return x.inputs["advantages"] != 0


def _gspo(x: LossInputs) -> LossOutput:
    q, adv = _float_input(x, "logprobs"), _float_input(x, "advantages")
    mask = _sequence_ratio_mask(x)
    return _rl_output(x, kernels.gspo(x.logprobs, x.logprobs.detach(), q, adv, mask, *_clip_bounds(x)))


def _stable_reinforce(x: LossInputs) -> LossOutput:
    """Tinker's StableReinforce objective is not public. What is (docs, SDK, cookbook): a REINFORCE variant that
    stays stable when the sampler differs from the learner (stale async samples, other numerics); samples are made
    with ``record_stability_info=True`` and every datum names its sampled sequences in provenance spans; nonzero
    advantages are accepted on sampled tokens only (``check_provenance_use`` enforces both); ``kl_coeff`` is its one
    documented setting.

    Assumed here: REINFORCE on the sampled tokens with a truncated, stop-gradient importance weight
    ``min(p/q, STABLE_REINFORCE_TRUNCATION)``, which stays bounded however stale the sample, plus ``kl_coeff`` times
    a squared log-ratio penalty ``(log p - log q)^2 / 2`` on the sampled tokens that pulls the learner toward the
    sampler. The sampler's logprobs are the ones the datum carries; the server does not look the named sequences
    up (it records nothing more at sampling time than it returns)."""
    q, adv = _float_input(x, "logprobs"), _float_input(x, "advantages")
    elementwise = kernels.truncated_importance_reinforce(
        x.logprobs, x.logprobs.detach(), q, adv, STABLE_REINFORCE_TRUNCATION
    )
    kl_coeff = float(x.config.get("kl_coeff", STABLE_REINFORCE_KL_COEFF_DEFAULT))
    if kl_coeff > 0.0 and x.sampled is not None:
        elementwise = elementwise + kernels.sampled_log_ratio_penalty(x.logprobs, q, x.sampled, kl_coeff)
    return _rl_output(x, elementwise)


def _dppo(x: LossInputs) -> LossOutput:
    """``kernels.dppo`` over the datum's ``weights`` when it has them, else over its scored tokens (sampled, or with a
    nonzero advantage); the metrics add the fraction of those tokens outside the trust region."""
    q, adv = _float_input(x, "logprobs"), _float_input(x, "advantages")
    mask = _float_input(x, "weights") if "weights" in x.inputs else _scored_tokens(x).to(x.logprobs.dtype)
    high, low = x.config["dppo_mask_high"], x.config["dppo_mask_low"]
    out = _rl_output(x, kernels.dppo(x.logprobs, q, adv, mask, high, low, x.config["adv_tau"], x.config["kl_tau"]))
    with torch.no_grad():
        left = kernels.dppo_left_trust_region(x.logprobs.detach(), q, adv, mask, high, low)
        inside = int((mask != 0).sum())
        out.metrics["dppo_masked_fraction:mean"] = float(left.sum()) / inside if inside else 0.0
    return out


LOSSES: dict[str, Callable[[LossInputs], LossOutput]] = {
    "cross_entropy": _cross_entropy,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
    "gspo": _gspo,
    "stable_reinforce": _stable_reinforce,
    "dppo": _dppo,
}
