"""Losses over pairs of datums: ``dpo`` scores a (chosen, rejected) pair, the chosen at an even index of the request
and its rejected right after it (the Loops SDK keeps such pairs in one request when it splits a large one).

A pair's loss is divided by the request's number of pairs, so a request's ``loss:sum`` is the mean DPO loss over its
pairs (the form DPO is usually reported in; a sum over pairs would make the step size grow with the batch). The pair's
loss is reported on its chosen datum; the rejected one reports 0 and the pair's gradient reaches both through it.
"""

from __future__ import annotations

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.engine.losses import kernels
from tinkerd.engine.losses.registry import checked, is_paired
from tinkerd.engine.losses.types import LossInputs, LossOutput


def check_pairing(name: str, num_datums: int) -> None:
    """A paired loss needs an even, nonzero number of datums."""
    if is_paired(name) and num_datums % 2:
        raise InvalidRequestError(
            f"loss_fn {name!r} takes (chosen, rejected) pairs: even datums are chosen and each is followed by its "
            f"rejected one, so the request needs an even number of datums; it has {num_datums}"
        )


def compute_pair_loss(
    name: str, chosen: LossInputs, rejected: LossInputs, num_pairs: int
) -> tuple[LossOutput, LossOutput]:
    """Validate a pair for loss ``name`` (``dpo``) and compute its share of the request's loss."""
    if name != "dpo":
        raise ValueError(f"loss {name!r} is not a paired loss")
    c, r = checked(name, chosen), checked(name, rejected)
    beta, smoothing = c.config["beta"], c.config["label_smoothing"]
    loss, s_chosen, s_rejected = kernels.dpo(
        c.logprobs,
        c.inputs["ref_logprobs"].to(c.logprobs),
        c.inputs["weights"].to(c.logprobs),
        r.logprobs,
        r.inputs["ref_logprobs"].to(r.logprobs),
        r.inputs["weights"].to(r.logprobs),
        beta,
        smoothing,
    )
    share = loss / num_pairs
    margin = float((s_chosen - s_rejected).detach())
    chosen_metrics = {
        "loss:sum": float(share.detach()),
        "dpo_accuracy:mean": 1.0 if margin > 0 else 0.0,
        "dpo_margin:mean": beta * margin,
        "dpo_chosen_reward:mean": beta * float(s_chosen.detach()),
        "dpo_rejected_reward:mean": beta * float(s_rejected.detach()),
    }
    zero = torch.zeros((), dtype=share.dtype, device=share.device)
    return (
        LossOutput(loss=share, outputs={"logprobs": c.logprobs.detach()}, metrics=chosen_metrics),
        LossOutput(loss=zero, outputs={"logprobs": r.logprobs.detach()}, metrics={"loss:sum": 0.0}),
    )
