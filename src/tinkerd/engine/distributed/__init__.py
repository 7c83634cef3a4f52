"""One trainer across N ranks (one process per device) with torch.distributed.

Rank 0 is the trainer the worker drives (``leader.DistributedServedModel``, a ``ServedModel``); ranks 1..N-1 run
``follower.follow``, executing what rank 0 sends them over the process group (``channel``): adapter creation and
loading, each forward_backward's share of the datums (``split``), and optimizer steps after the gradients are summed
across ranks (``replica``). The frozen base is replicated on every rank (DDP-style), or sharded across them with
FSDP2 (``sharding``); LoRA weights and AdamW state are identical on every rank. Nothing here knows HTTP, the
ledger or settings; the composition root starts the ranks (``launch``, or torchrun) and hands rank 0 its ``Channel``.
"""

from tinkerd.engine.distributed.channel import Channel, RankLostError
from tinkerd.engine.distributed.group import RankInfo, backend_for, join_group, rank_device, rank_from_env
from tinkerd.engine.distributed.leader import DistributedServedModel

__all__ = [
    "Channel",
    "DistributedServedModel",
    "RankInfo",
    "RankLostError",
    "backend_for",
    "join_group",
    "rank_device",
    "rank_from_env",
]
