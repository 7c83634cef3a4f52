"""One served base model and every LoRA adapter trained on it: forward/backward, optimizer steps, snapshots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, ForwardResult, LoraConfig, OptimStepResult
from tinkerd.engine.batching import Row, micro_batches, pack_rows, prepare_row
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.lora import LoraWeights, init_lora_weights
from tinkerd.engine.losses import LossInputs, compute_loss, reduce_metrics, required_inputs
from tinkerd.engine.model_paths import build_forward, load_hf_model, load_image_processor
from tinkerd.engine.optim import AdamState, adamw_step

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
        weights = init_lora_weights(self.train.hf, config, self.device)
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
        rows: list[Row] = []
        for j, job in enumerate(jobs):
            rows.extend(self._rows_of(j, job))
        per_job: list[list[dict[str, ArrayData] | None]] = [[None] * len(job.datums) for job in jobs]
        metrics: list[list[dict[str, float]]] = [[{} for _ in job.datums] for job in jobs]
        for grad_mode in (False, True):
            selected = [r for r in rows if jobs[r.job].backward == grad_mode]
            for group in micro_batches(selected, self.config.max_tokens_per_pass):
                self._run_group(group, jobs, grad_mode, per_job, metrics)
        results: list[ForwardResult] = []
        for j, _job in enumerate(jobs):
            outputs = [o for o in per_job[j] if o is not None]
            assert len(outputs) == len(per_job[j])
            results.append(ForwardResult(loss_fn_outputs=outputs, metrics=reduce_metrics(metrics[j])))
        return results

    def validate(self, job: ForwardJob) -> None:
        """Raise InvalidRequestError for anything wrong with the job, without running the model.

        The loss runs once on stand-in logprobs so that bad loss config or input shapes fail here, alone, rather
        than inside a batch shared with other runs' work.
        """
        for row in self._rows_of(0, job):
            for i, image in enumerate(row.images):  # processed and encoded (and cached) now, before any batch
                assert isinstance(self.train, GenericTransformer) and self.train.images is not None
                self.train.images.encode(image, f"datum {row.index} image {i}")
            stand_in = torch.zeros(row.targets_T_K.shape if row.targets_2d else row.targets_T_K.shape[:1])
            compute_loss(job.loss_fn, _loss_inputs(row, stand_in, job))

    def _rows_of(self, j: int, job: ForwardJob) -> list[Row]:
        if job.adapter_id is not None:
            self.adapter(job.adapter_id)
        elif job.backward:
            raise InvalidRequestError("forward_backward needs a LoRA training run; the base model is frozen")
        if not job.datums:
            raise InvalidRequestError("the request has no datums")
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
        per_job: list[list[dict[str, ArrayData] | None]],
        metrics: list[list[dict[str, float]]],
    ) -> None:
        weights: dict[str, LoraWeights | None] = {BASE_KEY: None}
        weights.update({k: a.weights for k, a in self.adapters.items()})
        packed = pack_rows(group, weights, self.device)
        with torch.set_grad_enabled(grad_mode):
            seqs = [r.tokens for r in packed.rows]
            images = [r.images for r in packed.rows]
            if any(images):  # only a generic forward with an image encoder lets rows with images through _rows_of
                assert isinstance(self.train, GenericTransformer)
                logprobs_N_K = self.train.sequence_logprobs(seqs, packed.targets_N_K, packed.routing, images)
            else:
                logprobs_N_K = self.train.sequence_logprobs(seqs, packed.targets_N_K, packed.routing)
            total: torch.Tensor | None = None
            for row, off in zip(packed.rows, packed.offsets, strict=True):
                k = row.targets_T_K.shape[1]
                lp = logprobs_N_K[off : off + len(row.tokens), :k]
                lp = lp if row.targets_2d else lp[:, 0]
                job = jobs[row.job]
                out = compute_loss(job.loss_fn, _loss_inputs(row, lp, job))
                total = out.loss if total is None else total + out.loss
                outputs = {"logprobs": _array(lp.detach())}
                outputs.update({name: _array(t.detach()) for name, t in out.outputs.items()})
                per_job[row.job][row.index] = outputs
                metrics[row.job][row.index] = out.metrics
            if grad_mode and total is not None and total.requires_grad:
                total.backward()

    # -- optimizer --------------------------------------------------------------------------------------------------

    def optim_step(self, adapter_id: str, adam: AdamParams) -> OptimStepResult:
        adapter = self.adapter(adapter_id)  # adamw_step validates the hyperparameters
        metrics = adamw_step(list(adapter.weights.parameters()), adapter.optimizer, adam)
        return OptimStepResult(metrics=metrics)


def _array(t: torch.Tensor) -> ArrayData:
    return ArrayData(values=t.float().flatten().tolist(), shape=tuple(t.shape), dtype="float32")


def _loss_inputs(row: Row, logprobs: torch.Tensor, job: ForwardJob) -> LossInputs:
    return LossInputs(logprobs=logprobs, inputs=row.inputs, config=job.loss_fn_config, sampled=row.sampled_T)
