"""One served base model and every LoRA adapter trained on it: forward/backward, optimizer steps, snapshots."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, ForwardResult, LoraConfig, OptimStepResult
from tinkerd.engine.batching import PackedRows, Row, micro_batches, pack_rows, prepare_row
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.lora import LoraWeights, init_lora_weights
from tinkerd.engine.lora_targets import is_expert_param
from tinkerd.engine.losses import LossInputs, LossOutput, compute_loss, is_paired, reduce_metrics, required_inputs
from tinkerd.engine.losses.preference import check_pairing, compute_pair_loss
from tinkerd.engine.model_paths import build_forward, load_hf_model, load_image_processor
from tinkerd.engine.moe import RouterTrace, router_metrics
from tinkerd.engine.optim import AdamState, adamw_step
from tinkerd.engine.transformer import Transformer

BASE_KEY = ""  # adapter key of the bare base model (forward only)


@dataclass
class Adapter:
    """A training run's trainable state: LoRA weights (fp32), accumulated gradients and AdamW moments."""

    adapter_id: str
    config: LoraConfig
    weights: LoraWeights
    optimizer: AdamState = field(default_factory=AdamState)

    def num_parameters(self) -> int:
        return self.weights.num_parameters()


@dataclass(frozen=True)
class ForwardJob:
    """One forward or forward_backward request: datums of one adapter (None: the base model) and their loss."""

    adapter_id: str | None
    datums: Sequence[Datum]
    loss_fn: str
    loss_fn_config: Mapping[str, float] = field(default_factory=dict)
    backward: bool = False
    # how many datums the request has when ``datums`` holds none of them (a distributed trainer's follower gets the
    # job without its datums); 0 means ``len(datums)``
    request_size: int = 0
    top_k: int = 0  # also return each position's top_k most likely next tokens and their logprobs

    @property
    def num_datums(self) -> int:
        return self.request_size or len(self.datums)


class ServedModel:
    """A frozen base model shared by many adapters. Not thread-safe: one worker drives it."""

    def __init__(self, name: str, hf_model: torch.nn.Module, config: EngineConfig, image_processor: Any = None) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.name = name
        self.config = config
        self.device = config.torch_device
        # the packed or the generic forward (with the model's image processor, for a vision-language model)
        self.train = build_forward(hf_model, config.train_torch_dtype, image_processor)
        self.adapters: dict[str, Adapter] = {}

    @staticmethod
    def from_directory(name: str, path: Path, config: EngineConfig) -> ServedModel:
        return ServedModel(name, load_hf_model(path, config.torch_device), config, load_image_processor(path))

    @property
    def vocab_size(self) -> int:
        return self.train.shape.vocab_size

    @property
    def max_positions(self) -> int:
        return self.train.shape.max_positions

    # -- adapters ---------------------------------------------------------------------------------------------------

    def create_adapter(self, adapter_id: str, config: LoraConfig) -> Adapter:
        if adapter_id in self.adapters:
            raise InvalidRequestError(f"adapter {adapter_id!r} already exists")
        weights = init_lora_weights(self.train.hf, config, self.device, self.train.expert_targets)
        adapter = Adapter(adapter_id, config, weights)
        self.adapters[adapter_id] = adapter
        return adapter

    def adapter(self, adapter_id: str) -> Adapter:
        try:
            return self.adapters[adapter_id]
        except KeyError:
            raise NotFoundError(f"no adapter {adapter_id!r} on model {self.name!r}") from None

    def remove_adapter(self, adapter_id: str) -> None:
        self.adapters.pop(adapter_id, None)

    def install_adapter(
        self, adapter_id: str, config: LoraConfig, weights: LoraWeights, optimizer: AdamState | None
    ) -> Adapter:
        """Replace (or create) an adapter from loaded weights, e.g. a checkpoint; gradients start empty."""
        unreached = [n for n in weights.a if is_expert_param(n) and n not in self.train.expert_targets]
        if unreached:
            raise InvalidRequestError(f"this model's engine path cannot apply LoRA to fused experts {unreached[:3]}")
        trainable = LoraWeights(
            rank=weights.rank,
            alpha=weights.alpha,
            a={k: v.detach().to(self.device, torch.float32).clone().requires_grad_(True) for k, v in weights.a.items()},
            b={k: v.detach().to(self.device, torch.float32).clone().requires_grad_(True) for k, v in weights.b.items()},
        )
        adapter = Adapter(adapter_id, config, trainable, optimizer or AdamState())
        self.adapters[adapter_id] = adapter
        return adapter

    def snapshot(self, adapter_id: str) -> LoraWeights:
        """Immutable copy of an adapter's current weights (a sampler version)."""
        return self.adapter(adapter_id).weights.snapshot()

    # -- forward / backward -----------------------------------------------------------------------------------------

    def forward(self, jobs: Sequence[ForwardJob]) -> list[ForwardResult]:
        """Run every job's datums in shared passes; backward for jobs that ask, accumulating into adapter grads.

        Validation happens before any computation, so a bad job fails before it (or any other) moves a weight;
        the caller batches jobs only after validating them one by one (see ``validate``).
        """
        return assemble_results(jobs, self.run_rows(self.rows_of_jobs(jobs), jobs))

    def rows_of_jobs(self, jobs: Sequence[ForwardJob]) -> list[Row]:
        """Every job's datums as rows (``Row.job`` indexes ``jobs``); raises InvalidRequestError for a bad one."""
        rows: list[Row] = []
        for j, job in enumerate(jobs):
            rows.extend(self._rows_of(j, job))
        return rows

    def run_rows(
        self, rows: Sequence[Row], jobs: Sequence[ForwardJob], passes: tuple[int, int] | None = None
    ) -> dict[tuple[int, int], DatumOutcome]:
        """Forward (and backward, for jobs that ask) of some rows of ``jobs``: each datum's outputs and metrics by
        (job, datum index). A distributed trainer runs a share of the rows on each rank (engine/distributed).

        ``passes``: with a sharded base, every rank runs this many passes without and with gradients (at least
        ``pass_counts``), idle ones after its own, so that every rank's collectives line up."""
        done: dict[tuple[int, int], DatumOutcome] = {}
        for grad_mode in (False, True):
            groups = self._groups(rows, jobs, grad_mode)
            for group in groups:
                self._run_group(group, jobs, grad_mode, done)
            if passes is not None:
                assert isinstance(self.train, Transformer) and self.train.shards is not None
                for _ in range(passes[int(grad_mode)] - len(groups)):
                    self.train.shards.idle_pass(grad_mode)
        return done

    def pass_counts(self, rows: Sequence[Row], jobs: Sequence[ForwardJob]) -> tuple[int, int]:
        """How many passes ``run_rows`` makes over ``rows``: without gradients, then with."""
        return len(self._groups(rows, jobs, False)), len(self._groups(rows, jobs, True))

    def _groups(self, rows: Sequence[Row], jobs: Sequence[ForwardJob], grad_mode: bool) -> list[list[Row]]:
        selected = [r for r in rows if jobs[r.job].backward == grad_mode]
        return micro_batches(selected, self.config.max_tokens_per_pass, paired_rows(jobs))

    def validate(self, job: ForwardJob) -> None:
        """Raise InvalidRequestError for anything wrong with the job, without running the model.

        The loss runs once on stand-in logprobs so that bad loss config or input shapes fail here, alone, rather
        than inside a batch shared with other runs' work.
        """
        rows = self._rows_of(0, job)
        stand_ins: list[LossInputs] = []
        for row in rows:
            for i, image in enumerate(row.images):  # processed and encoded (and cached) now, before any batch
                assert isinstance(self.train, GenericTransformer) and self.train.images is not None
                self.train.images.encode(image, f"datum {row.index} image {i}")
            stand_in = torch.zeros(row.targets_T_K.shape if row.targets_2d else row.targets_T_K.shape[:1])
            stand_ins.append(_loss_inputs(row, stand_in, job))
        if is_paired(job.loss_fn):
            for chosen, rejected in zip(stand_ins[0::2], stand_ins[1::2], strict=True):
                compute_pair_loss(job.loss_fn, chosen, rejected, len(rows) // 2)
        else:
            for inputs in stand_ins:
                compute_loss(job.loss_fn, inputs)

    def _rows_of(self, j: int, job: ForwardJob) -> list[Row]:
        if job.adapter_id is not None:
            self.adapter(job.adapter_id)
        elif job.backward:
            raise InvalidRequestError("forward_backward needs a LoRA training run; the base model is frozen")
        if not job.datums:
            raise InvalidRequestError("the request has no datums")
        check_pairing(job.loss_fn, len(job.datums))
        needed = required_inputs(job.loss_fn)
        key = job.adapter_id if job.adapter_id is not None else BASE_KEY
        rows: list[Row] = []
        for i, datum in enumerate(job.datums):
            rows.append(prepare_row(j, i, datum, key, self.vocab_size, self.max_positions, self.device))
            if datum.images:
                images = self.train.images if isinstance(self.train, GenericTransformer) else None
                if images is None:
                    raise InvalidRequestError(f"datum {i} holds images, but model {self.name!r} takes none")
                images.check(datum.tokens, datum.images, f"datum {i}")
            missing = [name for name in needed if name not in datum.loss_fn_inputs]
            if missing:
                raise InvalidRequestError(f"datum {i}: loss {job.loss_fn!r} needs loss_fn_inputs {missing}")
        return rows

    def _run_group(
        self,
        group: list[Row],
        jobs: Sequence[ForwardJob],
        grad_mode: bool,
        done: dict[tuple[int, int], DatumOutcome],
    ) -> None:
        weights: dict[str, LoraWeights | None] = {BASE_KEY: None}
        weights.update({k: a.weights for k, a in self.adapters.items()})
        packed = pack_rows(group, weights, self.device)
        moe = isinstance(self.train, Transformer) and any(self.train.sparse)
        tracing = self.train.tracing_router() if isinstance(self.train, Transformer) and moe else nullcontext(None)
        shards = self.train.shards if isinstance(self.train, Transformer) else None
        with torch.set_grad_enabled(grad_mode), tracing as trace, shards.one_pass() if shards else nullcontext():
            k = max(jobs[r.job].top_k for r in packed.rows)
            logprobs_N_K, top_N_k = self._score(packed, k)
            total: torch.Tensor | None = None
            inputs: dict[tuple[int, int], LossInputs] = {}
            for row, off in zip(packed.rows, packed.offsets, strict=True):
                k = row.targets_T_K.shape[1]
                lp = logprobs_N_K[off : off + len(row.tokens), :k]
                inputs[(row.job, row.index)] = _loss_inputs(row, lp if row.targets_2d else lp[:, 0], jobs[row.job])
            for key, out in _losses(inputs, jobs).items():
                total = out.loss if total is None else total + out.loss
                outputs = {"logprobs": _array(inputs[key].logprobs.detach())}
                outputs.update({name: _array(t.detach()) for name, t in out.outputs.items()})
                done[key] = DatumOutcome(outputs, out.metrics)
            if top_N_k is not None:
                _add_top_k(top_N_k, packed.rows, packed.offsets, jobs, done)
            if trace is not None:
                _add_router_metrics(trace, packed.rows, packed.offsets, done)
            if grad_mode and total is not None and total.requires_grad:
                total.backward()

    def _score(self, packed: PackedRows, k: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The packed rows' target logprobs (differentiable) and, when ``k`` > 0, each position's top-k (logprobs,
        token ids) from the same pass."""
        seqs = [r.tokens for r in packed.rows]
        images = [r.images for r in packed.rows]
        if any(images):  # only a generic forward with an image encoder lets rows with images through _rows_of
            assert isinstance(self.train, GenericTransformer)
            lp, values, ids = self.train.sequence_logprobs_and_top_k(
                seqs, packed.targets_N_K, packed.routing, k, images
            )
            return lp, (values, ids) if k > 0 else None
        if k == 0:
            return self.train.sequence_logprobs(seqs, packed.targets_N_K, packed.routing), None
        lp, values, ids = self.train.sequence_logprobs_and_top_k(seqs, packed.targets_N_K, packed.routing, k)
        return lp, (values, ids)

    # -- optimizer --------------------------------------------------------------------------------------------------

    def optim_step(self, adapter_id: str, adam: AdamParams) -> OptimStepResult:
        adapter = self.adapter(adapter_id)  # adamw_step validates the hyperparameters
        metrics = adamw_step(list(adapter.weights.parameters()), adapter.optimizer, adam)
        return OptimStepResult(metrics=metrics)

    def discard_grads(self, adapter_id: str) -> None:
        """Drop the gradients an adapter accumulated since its last optim_step (the next step then moves nothing)."""
        with torch.no_grad():
            for p in self.adapter(adapter_id).weights.parameters():
                p.grad = None


@dataclass(frozen=True)
class DatumOutcome:
    """What one datum's forward gave: its loss_fn_outputs and its per-datum metrics (reduced per request later)."""

    outputs: dict[str, ArrayData]
    metrics: dict[str, float]


def assemble_results(jobs: Sequence[ForwardJob], done: Mapping[tuple[int, int], DatumOutcome]) -> list[ForwardResult]:
    """Each job's result from its datums' outcomes, in the order of its datums (metrics reduced over them)."""
    results: list[ForwardResult] = []
    for j, job in enumerate(jobs):
        outcomes = [done[(j, i)] for i in range(len(job.datums))]
        results.append(
            ForwardResult(
                loss_fn_outputs=[o.outputs for o in outcomes], metrics=reduce_metrics([o.metrics for o in outcomes])
            )
        )
    return results


def _add_router_metrics(
    trace: RouterTrace, rows: Sequence[Row], offsets: Sequence[int], done: Mapping[tuple[int, int], DatumOutcome]
) -> None:
    """MoE load-balancing statistics over each request's tokens in this pass, on its first datum here (the request's
    other datums do not report them, so the request's reduced metrics are these values)."""
    tokens: dict[int, list[int]] = {}
    first: dict[int, Row] = {}
    for row, off in zip(rows, offsets, strict=True):
        first.setdefault(row.job, row)
        tokens.setdefault(row.job, []).extend(range(off, off + len(row.tokens)))
    for job, index in tokens.items():
        done[(job, first[job].index)].metrics.update(router_metrics(trace, torch.tensor(index)))


def _add_top_k(
    top_N_k: tuple[torch.Tensor, torch.Tensor],
    rows: Sequence[Row],
    offsets: Sequence[int],
    jobs: Sequence[ForwardJob],
    done: Mapping[tuple[int, int], DatumOutcome],
) -> None:
    """``top_k_logprobs`` and ``top_k_token_ids`` ([T, k], most likely first) into the outputs of the rows whose
    request asked for them."""
    values_N_k, ids_N_k = top_N_k
    for row, off in zip(rows, offsets, strict=True):
        k = jobs[row.job].top_k
        if k == 0:
            continue
        span = slice(off, off + len(row.tokens))
        outputs = done[(row.job, row.index)].outputs
        outputs["top_k_logprobs"] = _array(values_N_k[span, :k])
        ids = ids_N_k[span, :k]
        outputs["top_k_token_ids"] = ArrayData(values=ids.flatten().tolist(), shape=tuple(ids.shape), dtype="int64")


def _array(t: torch.Tensor) -> ArrayData:
    return ArrayData(values=t.float().flatten().tolist(), shape=tuple(t.shape), dtype="float32")


def paired_rows(jobs: Sequence[ForwardJob]) -> Callable[[Row], bool]:
    """Which rows belong to a request whose loss scores pairs of datums (to keep each pair in one pass)."""
    return lambda row: is_paired(jobs[row.job].loss_fn)


def _losses(
    inputs: Mapping[tuple[int, int], LossInputs], jobs: Sequence[ForwardJob]
) -> dict[tuple[int, int], LossOutput]:
    """Each datum's loss by (job, datum index); a paired loss's datums come with their partners (micro_batches)."""
    out: dict[tuple[int, int], LossOutput] = {}
    for (j, i), x in inputs.items():
        job = jobs[j]
        if not is_paired(job.loss_fn):
            out[(j, i)] = compute_loss(job.loss_fn, x)
        elif i % 2 == 0:
            chosen, rejected = compute_pair_loss(job.loss_fn, x, inputs[(j, i + 1)], job.num_datums // 2)
            out[(j, i)], out[(j, i + 1)] = chosen, rejected
    return out


def _loss_inputs(row: Row, logprobs: torch.Tensor, job: ForwardJob) -> LossInputs:
    return LossInputs(logprobs=logprobs, inputs=row.inputs, config=job.loss_fn_config, sampled=row.sampled_T)
