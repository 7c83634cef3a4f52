"""What every rank does to its own copy of the trainer, the same on rank 0 and on the followers.

A forward share runs on each rank at once; then every rank learns whether any rank failed (one ``all_reduce``), and
if one did, every rank puts its gradients back as they were before the batch, so a failed request leaves no half
gradient on any rank. Gradients stay local between optim_steps (each rank holds the sum over its own shares); an
optim_step sums them over the ranks in one ``all_reduce`` and every rank then takes the same AdamW step. The Tinker
losses are sums over tokens, so the sum of the ranks' gradients is the gradient one rank would have computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from tinkerd.domain.errors import InvalidRequestError, TinkerdError
from tinkerd.engine.batching import Row, prepare_row
from tinkerd.engine.distributed.channel import Channel
from tinkerd.engine.distributed.commands import ForwardShare
from tinkerd.engine.served_model import BASE_KEY, DatumOutcome, ForwardJob, ServedModel
from tinkerd.engine.transformer import Transformer

Outcomes = dict[tuple[int, int], DatumOutcome]


@dataclass(frozen=True)
class ShareFailure:
    """Why a rank's share failed: a user error (the request's fault) or an internal one, with the rank's message."""

    rank: int
    user_error: bool
    message: str

    def exception(self) -> Exception:
        if self.user_error:
            return InvalidRequestError(self.message)
        return RuntimeError(f"rank {self.rank}: {self.message}")


def rows_of_share(served: ServedModel, share: ForwardShare) -> list[Row]:
    """A follower's rows, numbered as in the whole batch (rank 0 validated every datum before sending)."""
    rows: list[Row] = []
    for j, i, datum in share.datums:
        job = share.jobs[j]
        key = job.adapter_id if job.adapter_id is not None else BASE_KEY
        rows.append(prepare_row(j, i, datum, key, served.vocab_size, served.max_positions, served.device))
    return rows


def run_share(
    channel: Channel, served: ServedModel, rows: Callable[[], Sequence[Row]], jobs: Sequence[ForwardJob]
) -> list[Outcomes | ShareFailure] | None:
    """This rank's share of a batch (its ``rows()``), then the exchange of outcomes: every rank's outcomes on rank 0
    (None elsewhere).

    A rank's own failure is caught and reported, never raised: every rank must reach the collectives that follow.
    """
    params = list(_backward_params(served, jobs))
    saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
    outcome: Outcomes | ShareFailure
    if isinstance(served.train, Transformer) and served.train.shards is not None:
        outcome = _run_sharded(channel, served, rows, jobs)
    else:
        try:
            share = rows()
            outcome = served.run_rows(share, jobs) if share else {}
        except Exception as exc:
            outcome = _failure(channel, exc)
    if channel.any_rank(isinstance(outcome, ShareFailure)):
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
    return channel.gather(outcome)


def _run_sharded(
    channel: Channel, served: ServedModel, rows: Callable[[], Sequence[Row]], jobs: Sequence[ForwardJob]
) -> Outcomes | ShareFailure:
    """A share over a sharded base: every rank, even one with no rows, runs as many passes of each kind as the rank
    with the most (each pass gathers every layer: the ranks' collectives must line up). A pass that fails half way
    leaves the ranks' collectives out of step for good, so it stops the trainer (the leader checked every job's
    datums and loss before sending, so what fails there is not the request's fault)."""
    failure: ShareFailure | None = None
    share: Sequence[Row] = ()
    try:
        share = rows()
    except Exception as exc:
        failure = _failure(channel, exc)
    no_grad, grad = channel.max_(served.pass_counts(share, jobs))
    try:
        done = served.run_rows(share, jobs, (no_grad, grad))
    except Exception as exc:
        raise channel.abandon(f"a pass over the sharded base failed on rank {channel.info.rank}: {exc}") from exc
    return failure if failure is not None else done


def _failure(channel: Channel, exc: Exception) -> ShareFailure:
    user = isinstance(exc, TinkerdError)
    return ShareFailure(channel.info.rank, user, str(exc) if user else f"{type(exc).__name__}: {exc}")


def _backward_params(served: ServedModel, jobs: Iterable[ForwardJob]) -> Iterable[torch.Tensor]:
    ids = sorted({job.adapter_id for job in jobs if job.backward and job.adapter_id is not None})
    for adapter_id in ids:
        adapter = served.adapters.get(adapter_id)
        if adapter is not None:
            yield from adapter.weights.parameters()


def sum_grads(channel: Channel, served: ServedModel, adapter_id: str) -> None:
    """Replace each rank's gradients of an adapter by their sum over the ranks (one collective).

    A parameter with a gradient on no rank keeps ``grad = None`` (AdamW then leaves it alone, as one rank would);
    one with a gradient on some ranks gets the sum, counting the others as zero.
    """
    params = list(served.adapter(adapter_id).weights.parameters())
    if not params:
        return
    pieces = [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1) for p in params]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=pieces[0].dtype, device=pieces[0].device)
    flat = torch.cat([*pieces, has_grad])
    channel.sum_(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    for p, count in zip(params, flat[offset:].tolist(), strict=True):
        if count == 0:
            p.grad = None


def digest(served: ServedModel, adapter_id: str) -> str:
    """A hash of an adapter's weights and optimizer state, bit for bit (equal on every rank of a healthy trainer)."""
    adapter = served.adapters.get(adapter_id)
    if adapter is None:
        return "absent"
    h = hashlib.sha256()
    tensors = list(adapter.weights.parameters()) + adapter.optimizer.exp_avg + adapter.optimizer.exp_avg_sq
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(repr(adapter.optimizer.steps).encode())
    return h.hexdigest()
