"""The frozen base sharded across a trainer's ranks with FSDP2 (``torch.distributed.fsdp.fully_shard``), driven by hand.

Each decoder layer is one FSDP2 unit; the root unit holds the rest (embedding, final norm, unembedding). Between
uses a rank holds only its 1/N slice of each unit's weights. Our packed forward reads a layer's weights itself and
never calls the layer's ``forward``, so FSDP2's own hooks never fire: we call ``unshard()`` (an all-gather) and
``reshard()`` (free the gathered copy) ourselves, at these points of every pass:

- the root unit is gathered when the pass starts (the embedding) and stays gathered until the pass ends, backward
  included (the head is the last thing of the forward and the first of the backward);
- layer i is gathered where the residual stream enters it and released where it leaves (``_Enter`` / ``_Leave``,
  identities on the residual stream). Autograd saved the gathered weights for the input gradients, and releasing
  frees their storage, so in the backward the same two functions run the other way round: the gradient arriving at
  the layer's output gathers the layer again (into the very storage autograd saved), and the gradient leaving its
  input releases it. To make every layer's backward run on every rank (an adapter that trains only the head, or
  a rank whose rows' adapters touch fewer layers, would otherwise skip some layers' all-gathers), the residual
  stream is made to require a gradient from the embedding on, in a pass with gradients.

Every packed body calls these hooks (``Transformer.hidden``, and GPT-OSS's and Qwen3.5's own bodies), so a weight
of layer i may be read only between ``enter(i)`` and ``leave(i)``; the root's, anywhere in the pass. What a body
reads elsewhere is kept whole apart, taken before sharding (GPT-OSS's attention sinks, see ``gpt_oss.py``).

Collectives must come in the same order on every rank: a pass gathers each unit once in the forward and (with
gradients) once more per layer in the backward, so every rank runs as many passes of each kind as the rank with
the most, filling in with ``idle_pass`` (one dummy token through the bare base). ``replica.run_share`` arranges it.
LoRA weights and optimizer state are not sharded: they are small, and identical on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from tinkerd.domain.errors import SettingsError
from tinkerd.engine.lora import LoraRouting
from tinkerd.engine.served_model import ServedModel
from tinkerd.engine.transformer import Transformer


class _Enter(torch.autograd.Function):
    """Residual stream entering a layer: gather its weights; in the backward, release them (the layer is done)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, unit: FSDPModule) -> torch.Tensor:  # type: ignore[override]
        unit.unshard()
        ctx.unit = unit
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.unit.reshard()
        return grad, None


class _Leave(torch.autograd.Function):
    """Residual stream leaving a layer: release its weights; in the backward, gather them again first."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, unit: FSDPModule) -> torch.Tensor:  # type: ignore[override]
        unit.reshard()
        ctx.unit = unit
        return h.view_as(h)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.unit.unshard()
        return grad, None


class ShardedBase:
    """A ``Transformer`` whose frozen weights are FSDP2-sharded over all ranks of the default process group."""

    def __init__(self, transformer: Transformer, device: torch.device, world_size: int) -> None:
        self.transformer = transformer
        mesh = init_device_mesh(device.type, (world_size,))
        self.layers: list[FSDPModule] = []
        for layer in transformer.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
            self.layers.append(layer)
        fully_shard(transformer.hf, mesh=mesh, reshard_after_forward=True)
        root: Any = transformer.hf
        self.root: FSDPModule = root

    # -- what the packed bodies call (Transformer.hidden and its subclasses') ---------------------------------------

    def gather_root(self) -> None:
        """At the start of a pass (before the embedding): gather the root unit for the whole pass."""
        self.root.unshard()

    def residual(self, h_N_d: torch.Tensor) -> torch.Tensor:
        """The embedding's output; in a pass with gradients, a leaf that requires one (see the module's docstring)."""
        return h_N_d.detach().requires_grad_(True) if torch.is_grad_enabled() else h_N_d

    def enter(self, i: int, h_N_d: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Enter.apply(h_N_d, self.layers[i])  # type: ignore[no-untyped-call]
        return out

    def leave(self, i: int, h_N_d: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _Leave.apply(h_N_d, self.layers[i])  # type: ignore[no-untyped-call]
        return out

    # -- passes -----------------------------------------------------------------------------------------------------

    @contextmanager
    def one_pass(self) -> Iterator[None]:
        """Around a pass (forward, and backward if any): when it ends, every unit is back to its shard, also after
        an error (a no-op for units already released)."""
        try:
            yield
        finally:
            for layer in self.layers:
                layer.reshard()
            self.root.reshard()

    def idle_pass(self, grad: bool) -> None:
        """A pass over one dummy token of the bare base: the collectives of a real pass, for a rank with fewer rows."""
        t = self.transformer
        targets_N_K = torch.zeros(1, 1, dtype=torch.long, device=t.device)
        with torch.set_grad_enabled(grad), self.one_pass():
            logprobs_N_K = t.sequence_logprobs([[0]], targets_N_K, LoraRouting.single(1, None))
            if grad:
                logprobs_N_K.sum().backward()


def shard_served(served: ServedModel, world_size: int) -> None:
    """Shard ``served``'s frozen base over the default process group (every rank calls it, in the same order)."""
    train = served.train
    if not isinstance(train, Transformer):
        raise SettingsError(
            f"{served.name}: sharding the base (--base-sharding sharded) needs tinkerd's packed forward, which this "
            "model's architecture does not take; use --base-sharding replicated"
        )
    train.shards = ShardedBase(train, served.device, world_size)


def full_parameters(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """A module's parameters as whole tensors: a sharded one is all-gathered (a collective: every rank calls this
    in the same order)."""
    for p in module.parameters():
        yield p.full_tensor() if isinstance(p, DTensor) else p
