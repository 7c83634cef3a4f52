"""Which rank this process is, and joining the process group of one trainer's ranks (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tinkerd.domain.errors import SettingsError


@dataclass(frozen=True)
class RankInfo:
    """This process's place among the trainer's ranks, and where rank 0 keeps the rendezvous (a TCP store)."""

    rank: int
    world_size: int
    local_rank: int  # the rank's index on its host: which CUDA device it drives
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def env(self) -> dict[str, str]:
        """The variables torchrun sets, which ``rank_from_env`` reads back (for ranks tinkerd starts itself)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def rank_from_env(environ: Mapping[str, str]) -> RankInfo | None:
    """The rank torchrun (or tinkerd's own launcher) gave this process, or None outside a group of several ranks."""
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local = int(environ.get("LOCAL_RANK", rank))
        port = int(environ.get("MASTER_PORT", "29500"))
    except ValueError:
        raise SettingsError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be whole numbers") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise SettingsError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return RankInfo(rank, world, local, environ.get("MASTER_ADDR", "127.0.0.1"), port)


def backend_for(device: str) -> str:
    """NCCL between CUDA devices, gloo between CPU processes."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def rank_device(device: str, local_rank: int) -> str:
    """The device a rank computes on: one CUDA device per rank (``cuda:<local rank>``); a CPU rank stays on cpu."""
    if torch.device(device).type == "cuda":
        return f"cuda:{local_rank}"
    return device


def join_group(info: RankInfo, device: str, timeout_s: float, from_env: bool = False) -> torch.device:
    """Join the default process group of the trainer's ranks; returns this rank's device.

    ``from_env``: rendezvous as torchrun arranges it (``env://``: under torchrun its agent already holds the store
    on MASTER_PORT); otherwise rank 0 opens the store at ``info.master_addr:master_port``. Blocks until every rank
    has joined (at most ``timeout_s``); every collective afterwards fails rather than waits past ``timeout_s`` for a
    rank that is gone.
    """
    here = torch.device(rank_device(device, info.local_rank))
    if here.type == "cuda":
        if not torch.cuda.is_available() or info.local_rank >= torch.cuda.device_count():
            raise SettingsError(f"rank {info.rank} needs CUDA device {here}, which this host does not have")
        torch.cuda.set_device(here)  # the object collectives (and NCCL) use the current device
    dist.init_process_group(
        backend=backend_for(device),
        init_method="env://" if from_env else f"tcp://{info.master_addr}:{info.master_port}",
        rank=info.rank,
        world_size=info.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=here if here.type == "cuda" else None,
    )
    return here


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
