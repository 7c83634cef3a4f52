"""Ranks 1..N-1 of a distributed trainer: run what rank 0 sends until it says stop (or is gone).

A follower holds the same base models and adapters as rank 0 and no sampler: it only trains. A command it cannot
carry out (other than a forward share, whose failure is reported to rank 0 and undone on every rank) means its
adapters may now differ from rank 0's, so it raises and its process exits: the trainer stops rather than train on
diverged replicas.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from tinkerd.engine.distributed.channel import Channel
from tinkerd.engine.distributed.commands import (
    Command,
    CreateAdapter,
    Digest,
    DiscardGrads,
    ForwardShare,
    InstallAdapter,
    OptimStep,
    Ping,
    RemoveAdapter,
    Shutdown,
)
from tinkerd.engine.distributed.replica import digest, rows_of_share, run_share, sum_grads
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.optim import AdamState
from tinkerd.engine.served_model import ServedModel

log = logging.getLogger(__name__)


def follow(channel: Channel, models: Mapping[str, ServedModel]) -> None:
    """Execute rank 0's commands until Shutdown; RankLostError if rank 0 (or another rank) is gone."""
    while True:
        command = channel.receive()
        if isinstance(command, Shutdown):
            return
        if not isinstance(command, Ping):
            execute(channel, models[command.model], command)


def execute(channel: Channel, served: ServedModel, command: Command) -> None:
    match command:
        case ForwardShare():
            run_share(channel, served, lambda: rows_of_share(served, command), command.jobs)
        case OptimStep():
            sum_grads(channel, served, command.adapter_id)
            served.optim_step(command.adapter_id, command.adam)
        case CreateAdapter():
            served.remove_adapter(command.adapter_id)
            adapter = served.create_adapter(command.adapter_id, dataclasses.replace(command.config, seed=command.seed))
            adapter.config = command.config
        case RemoveAdapter():
            served.remove_adapter(command.adapter_id)
        case InstallAdapter():
            optimizer = AdamState()
            if command.optimizer is not None:
                optimizer.load_state_dict(command.optimizer)
                optimizer.exp_avg = [t.to(served.device) for t in optimizer.exp_avg]
                optimizer.exp_avg_sq = [t.to(served.device) for t in optimizer.exp_avg_sq]
            weights = LoraWeights(rank=command.rank, alpha=command.alpha, a=command.a, b=command.b)
            served.install_adapter(command.adapter_id, command.config, weights, optimizer)
        case DiscardGrads():
            served.discard_grads(command.adapter_id)
        case Digest():
            channel.gather(digest(served, command.adapter_id))
        case _:
            raise RuntimeError(f"rank {channel.info.rank} cannot run {type(command).__name__}")
