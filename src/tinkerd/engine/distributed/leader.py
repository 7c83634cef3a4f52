"""Rank 0 of a distributed trainer: a ``ServedModel`` whose state-changing calls also run on every other rank.

The worker drives it like any ``ServedModel`` (one thread). Every call checks its input on rank 0 first, so a bad
request fails before any rank moves; only then does the command go out. Forward batches are split across the
ranks by tokens (``split``), each rank packs and runs its share as one rank would, and rank 0 puts the outcomes back
in the request's order. Reads (``snapshot``, ``validate``, checkpoints) need no other rank: the adapters are the
same everywhere. Sampling uses rank 0's copy alone (with a sharded base, a full copy of its own: worker/hosts.py).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import AdamParams, ForwardResult, LoraConfig, OptimStepResult
from tinkerd.engine.batching import Row, units
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.distributed.channel import Channel
from tinkerd.engine.distributed.commands import (
    CreateAdapter,
    DiscardGrads,
    ForwardShare,
    InstallAdapter,
    OptimStep,
    RemoveAdapter,
)
from tinkerd.engine.distributed.commands import Digest as DigestCommand
from tinkerd.engine.distributed.replica import ShareFailure, digest, run_share, sum_grads
from tinkerd.engine.distributed.split import balance, datum_cost
from tinkerd.engine.lora import LoraWeights, validate_lora_config
from tinkerd.engine.optim import AdamState, check_adam_params
from tinkerd.engine.served_model import (
    Adapter,
    DatumOutcome,
    ForwardJob,
    ServedModel,
    assemble_results,
    paired_rows,
)
from tinkerd.engine.transformer import Transformer


class DistributedServedModel(ServedModel):
    def __init__(self, name: str, hf_model: torch.nn.Module, config: EngineConfig, channel: Channel) -> None:
        super().__init__(name, hf_model, config)
        self.channel = channel

    # -- adapters ---------------------------------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, config: LoraConfig) -> Adapter:
        if adapter_id in self.adapters:
            raise InvalidRequestError(f"adapter {adapter_id!r} already exists")
        validate_lora_config(config)
        # Without a seed each rank would draw its own A: rank 0 draws one and every rank initialises with it.
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**63)
        adapter = super().create_adapter(adapter_id, dataclasses.replace(config, seed=seed))
        adapter.config = config
        with self.channel.exchange():
            self.channel.send_all(CreateAdapter(self.name, adapter_id, config, seed))
        return adapter

    def remove_adapter(self, adapter_id: str) -> None:
        if adapter_id not in self.adapters:
            return  # every rank holds the same adapters: nothing to remove anywhere
        super().remove_adapter(adapter_id)
        with self.channel.exchange():
            self.channel.send_all(RemoveAdapter(self.name, adapter_id))

    def install_adapter(
        self, adapter_id: str, config: LoraConfig, weights: LoraWeights, optimizer: AdamState | None
    ) -> Adapter:
        adapter = super().install_adapter(adapter_id, config, weights, optimizer)
        a = {k: v.detach().cpu() for k, v in adapter.weights.a.items()}
        b = {k: v.detach().cpu() for k, v in adapter.weights.b.items()}
        state = {k: v.cpu() for k, v in adapter.optimizer.state_dict().items()}
        command = InstallAdapter(self.name, adapter_id, config, weights.rank, weights.alpha, a, b, state)
        with self.channel.exchange():
            self.channel.send_all(command)
        return adapter

    def discard_grads(self, adapter_id: str) -> None:
        super().discard_grads(adapter_id)
        with self.channel.exchange():
            self.channel.send_all(DiscardGrads(self.name, adapter_id))

    def digests(self, adapter_id: str) -> list[str]:
        """Every rank's hash of an adapter's weights and optimizer state, in rank order (equal when healthy)."""
        with self.channel.exchange():
            self.channel.send_all(DigestCommand(self.name, adapter_id))
            gathered = self.channel.gather(digest(self, adapter_id))
        assert gathered is not None
        return gathered

    # -- forward / backward -----------------------------------------------------------------------------------------

    def forward(self, jobs: Sequence[ForwardJob]) -> list[ForwardResult]:
        rows = self.rows_of_jobs(jobs)  # every datum is checked here, before any rank runs anything
        if isinstance(self.train, Transformer) and self.train.shards is not None:
            for job in jobs:  # and each loss: a pass over a sharded base cannot stop half way on one rank
                self.validate(job)
        shares = self._split(rows, jobs)
        headers = tuple(dataclasses.replace(job, datums=(), request_size=len(job.datums)) for job in jobs)
        sends: list[ForwardShare | None] = [None]
        for share in shares[1:]:
            datums = tuple((r.job, r.index, jobs[r.job].datums[r.index]) for r in share)
            sends.append(ForwardShare(self.name, headers, datums))
        with self.channel.exchange():
            self.channel.send(sends)
            gathered = run_share(self.channel, self, lambda: shares[0], jobs)
        assert gathered is not None
        failures = [g for g in gathered if isinstance(g, ShareFailure)]
        if failures:
            raise failures[0].exception()
        done: dict[tuple[int, int], DatumOutcome] = {}
        for outcomes in gathered:
            assert not isinstance(outcomes, ShareFailure)
            done.update(outcomes)
        return assemble_results(jobs, done)

    def _split(self, rows: list[Row], jobs: Sequence[ForwardJob]) -> list[list[Row]]:
        """Shares of about equal work; a pair of a paired loss (DPO) stays on one rank, whose pass scores it whole."""
        grouped = units(rows, paired_rows(jobs))
        costs = [sum(datum_cost(len(r.tokens), jobs[r.job].backward) for r in unit) for unit in grouped]
        return [[r for i in share for r in grouped[i]] for share in balance(costs, self.channel.world_size)]

    # -- optimizer --------------------------------------------------------------------------------------------------

    def optim_step(self, adapter_id: str, adam: AdamParams) -> OptimStepResult:
        self.adapter(adapter_id)
        check_adam_params(adam)  # both checked before any rank moves
        with self.channel.exchange():
            self.channel.send_all(OptimStep(self.name, adapter_id, adam))
            sum_grads(self.channel, self, adapter_id)
            return super().optim_step(adapter_id, adam)
