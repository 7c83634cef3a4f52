"""The built-in Tinker loss functions, per datum: sums over tokens, weights and advantages carry any normalisation.

``compute_loss(name, LossInputs(...))`` validates a datum and returns its ``LossOutput``; ``required_inputs`` and
``check_inputs`` / ``resolve_config`` let the engine reject a bad request before it runs the model; ``LOSSES`` maps
each name to its unvalidated per-datum function; ``reduce_metrics`` combines per-datum metrics into a batch's.
"""

from tinkerd.engine.losses.metrics import reduce_metrics
from tinkerd.engine.losses.registry import (
    LOSSES,
    SPECS,
    LossSpec,
    check_inputs,
    compute_loss,
    is_paired,
    required_inputs,
    resolve_config,
)
from tinkerd.engine.losses.types import LossInputs, LossOutput

__all__ = [
    "LOSSES",
    "SPECS",
    "LossInputs",
    "LossOutput",
    "LossSpec",
    "check_inputs",
    "compute_loss",
    "is_paired",
    "reduce_metrics",
    "required_inputs",
    "resolve_config",
]
