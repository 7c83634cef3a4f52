"""What rank 0 tells the other ranks to do: plain picklable values, one per call of the trainer that changes state.

Tensors travel on the CPU (the receiving rank moves them to its device), so the same commands serve gloo and NCCL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tinkerd.domain.ops import AdamParams, Datum, LoraConfig
from tinkerd.engine.served_model import ForwardJob


@dataclass(frozen=True)
class Ping:
    """Nothing to do: keeps an idle group's collectives inside their timeout, and finds a dead rank while idle."""


@dataclass(frozen=True)
class Shutdown:
    """Rank 0 is stopping: leave the group and exit cleanly."""


@dataclass(frozen=True)
class CreateAdapter:
    model: str
    adapter_id: str
    config: LoraConfig
    seed: int  # the seed rank 0 initialised with (drawn by rank 0 when the config has none): the same A everywhere


@dataclass(frozen=True)
class RemoveAdapter:
    model: str
    adapter_id: str


@dataclass(frozen=True)
class InstallAdapter:
    """An adapter loaded on rank 0 (a checkpoint): its weights and optimizer state, on the CPU."""

    model: str
    adapter_id: str
    config: LoraConfig
    rank: int
    alpha: float
    a: dict[str, torch.Tensor] = field(repr=False)
    b: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, torch.Tensor] | None = field(repr=False)


@dataclass(frozen=True)
class DiscardGrads:
    model: str
    adapter_id: str


@dataclass(frozen=True)
class OptimStep:
    """Sum the adapter's gradients over the ranks, then take the AdamW step every rank takes identically."""

    model: str
    adapter_id: str
    adam: AdamParams


@dataclass(frozen=True)
class ForwardShare:
    """A rank's share of one forward/forward_backward batch.

    ``jobs`` are the batch's jobs without their datums (loss, config, adapter, backward); ``datums`` are the
    (job index, datum index, datum) this rank runs, numbered as in the whole batch so outcomes go back in place.
    """

    model: str
    jobs: tuple[ForwardJob, ...]
    datums: tuple[tuple[int, int, Datum], ...]


@dataclass(frozen=True)
class Digest:
    """Every rank reports a hash of an adapter's weights and optimizer state (they must all be equal)."""

    model: str
    adapter_id: str


Command = (
    Ping | Shutdown | CreateAdapter | RemoveAdapter | InstallAdapter | DiscardGrads | OptimStep | ForwardShare | Digest
)
