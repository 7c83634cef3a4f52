"""Executing one request on the engine: the state-changing (barrier) kinds, one at a time.

Forward passes are batched across runs (``forward_batch``) and sampling is continuous (``sampling``); everything
else comes here. A handler returns the result or raises: a ``TinkerdError`` is the user's problem and fails the
request with its message, anything else is ours (see ``loop``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError, TinkerdError
from tinkerd.domain.ids import parse_training_run_id
from tinkerd.domain.ops import LoraConfig, OptimStepResult
from tinkerd.domain.paths import TinkerPath, parse_tinker_path
from tinkerd.domain.records import Checkpoint, Clock, FutureRecord, Sampler, TrainingRun, utc_now
from tinkerd.domain.requests import (
    AdapterState,
    CreateModel,
    CreateModelResult,
    Empty,
    JsonObject,
    LoadWeights,
    OptimStep,
    PathResult,
    Request,
    ResetAdapter,
    Result,
    SamplerResult,
    SaveWeights,
    SnapshotForSampler,
    UnloadModel,
)
from tinkerd.engine.checkpoint import check_compatible, checkpoint_size_bytes, load_checkpoint, save_checkpoint
from tinkerd.engine.lora import validate_lora_config
from tinkerd.engine.optim import AdamState
from tinkerd.store.storage import CheckpointStorage
from tinkerd.store.store import Store
from tinkerd.worker.runtime import LoadedRun, Runtime, SamplerSource, not_loaded_message

log = logging.getLogger(__name__)


@dataclass
class Handlers:
    store: Store
    runtime: Runtime
    files: CheckpointStorage
    clock: Clock = utc_now
    # Split deployment: samplers are other processes, so a snapshot for a sampler is also written to storage.
    share_snapshots: bool = False

    def execute(self, future: FutureRecord, request: Request) -> Result:
        """Run a single (non-forward, non-sample) request."""
        match request:
            case CreateModel():
                return self.create_model(future, request)
            case OptimStep():
                return self.optim_step(future, request)
            case SaveWeights():
                return self.save_weights(future, request)
            case SnapshotForSampler():
                return self.snapshot_for_sampler(future, request)
            case LoadWeights():
                return self.load_weights(future, request)
            case UnloadModel():
                return self.unload_model(future, request)
            case ResetAdapter():
                return self.reset_adapter(future, request)
            case _:
                raise InvalidRequestError(f"{type(request).__name__} cannot run on its own")

    # -- runs ----------------------------------------------------------------------------------------------------

    def create_model(self, future: FutureRecord, req: CreateModel) -> CreateModelResult:
        host = self.runtime.host(req.base_model)
        validate_lora_config(req.lora)
        if req.run_id in self.runtime.runs:
            raise ConflictError(f"training run {req.run_id!r} already exists")
        row = self._ensure_run_row(future.owner, req.run_id, req.base_model, req.lora, req.user_metadata)
        if row.base_model != req.base_model:
            raise ConflictError(f"training run {req.run_id!r} already exists on base model {row.base_model!r}")
        host.served.remove_adapter(req.run_id)  # a leftover of a run freed from memory but not from its host
        host.served.create_adapter(req.run_id, req.lora)
        self.runtime.add_run(LoadedRun(req.run_id, future.owner, row.session_id, req.base_model))
        return CreateModelResult(model_id=req.run_id)

    def unload_model(self, future: FutureRecord, req: UnloadModel) -> Empty:
        run = self.runtime.runs.get(req.run_id)
        if run is None or run.owner != future.owner:
            raise NotFoundError(not_loaded_message(req.run_id))
        self.runtime.free_run(req.run_id)
        return Empty()

    def reset_adapter(self, future: FutureRecord, req: ResetAdapter) -> AdapterState:
        """A fresh adapter with the run's own config (and seed) and an empty optimizer, in place of the current one."""
        run, host, adapter = self.runtime.training(req.run_id, future.owner)
        config = adapter.config
        host.served.remove_adapter(run.run_id)
        host.served.create_adapter(run.run_id, config)
        return AdapterState(step=0, lora_rank=config.rank)

    def optim_step(self, future: FutureRecord, req: OptimStep) -> OptimStepResult:
        run, host, _ = self.runtime.training(req.run_id, future.owner)
        try:
            result = host.served.optim_step(run.run_id, req.adam)
        except TinkerdError:
            raise  # validated before any weight moved
        except Exception:
            # The update may have stopped half way: flag the run so nobody trusts it silently.
            self._mark_corrupted(run)
            raise
        # A non-finite gradient norm means adamw_step skipped the update (update_skipped = 1 says so); JSON has no
        # NaN, so such values are left out of the metrics rather than failing a step that left the run consistent.
        return OptimStepResult(metrics={k: v for k, v in result.metrics.items() if math.isfinite(v)})

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def save_weights(self, future: FutureRecord, req: SaveWeights) -> PathResult:
        run, host, adapter = self.runtime.training(req.run_id, future.owner)
        path = TinkerPath(run.run_id, req.kind, req.name)  # validates the name: it becomes a directory
        now = self.clock()
        expires_at = self._expiry(now, req.ttl_seconds)  # checked before writing anything
        existed = self._checkpoint_exists(path, future.owner)
        if existed and not req.overwrite:
            raise ConflictError(f"checkpoint {path} already exists; save with overwrite=True to replace it")
        dest = self.files.write_dir(path)
        optimizer = adapter.optimizer.state_dict() if req.kind == "weights" else None
        save_checkpoint(dest, adapter.weights, adapter.config, host.name, optimizer, req.user_metadata)
        self.files.published(path)
        self.runtime.weights_cache.evict(path)
        size = checkpoint_size_bytes(dest)
        checkpoint = Checkpoint(
            run.run_id, req.kind, req.name, future.owner, now, size, expires_at, user_metadata=dict(req.user_metadata)
        )
        try:
            self.store.checkpoints.add(checkpoint, overwrite=req.overwrite)
        except Exception:
            if not existed:  # files nobody can list or load: remove them
                self.files.delete(path)
            raise
        return PathResult(path=str(path), model_id=run.run_id, size_bytes=size, step=adapter.optimizer.step)

    def snapshot_for_sampler(self, future: FutureRecord, req: SnapshotForSampler) -> SamplerResult:
        run, host, adapter = self.runtime.training(req.run_id, future.owner)
        snapshot = host.served.snapshot(run.run_id)  # an immutable copy: training on does not change this sampler
        if self.share_snapshots:
            shared = self.files.snapshot_write_dir(req.sampler_id)
            save_checkpoint(shared, snapshot, adapter.config, host.name, None, {})
            self.files.snapshot_published(req.sampler_id)
        record = Sampler(
            id=req.sampler_id,
            session_id=run.session_id,
            owner=future.owner,
            base_model=run.base_model,
            created_at=self.clock(),
            run_id=run.run_id,
            run_version=future.seq_id if future.seq_id is not None else 0,
        )
        self.store.samplers.create(record, exist_ok=True)  # the api may have created it at submit
        self.runtime.samplers[req.sampler_id] = SamplerSource(
            req.sampler_id, future.owner, run.session_id, run.base_model, snapshot=snapshot
        )
        return SamplerResult(sampling_session_id=req.sampler_id)

    def load_weights(self, future: FutureRecord, req: LoadWeights) -> PathResult:
        path = parse_tinker_path(req.path)
        self.store.checkpoints.get(path, future.owner)  # NotFoundError unless the owner may read it
        row = self._find_run_row(req.run_id, future.owner)
        base_model = row.base_model if row is not None else req.create_base_model
        if base_model is None:
            base_model = self.store.runs.get(path.run_id, future.owner, accessible=True).base_model
        host = self.runtime.host(base_model)
        if req.create and req.run_id in self.runtime.runs:
            raise ConflictError(f"training run {req.run_id!r} already exists")
        if not req.create and row is None:
            raise NotFoundError(f"unknown training run {req.run_id!r}")

        loaded = load_checkpoint(self.files.read_dir(path), host.served.device, load_optimizer=req.with_optimizer)
        check_compatible(loaded.weights, host.served.train.hf)
        if loaded.base_model and loaded.base_model != host.name:
            raise InvalidRequestError(
                f"checkpoint {path} was trained on {loaded.base_model!r}, not on this run's base model {host.name!r}"
            )
        optimizer = AdamState()
        if req.with_optimizer:
            if loaded.optimizer_state is None:
                raise InvalidRequestError(
                    f"checkpoint {path} holds no optimizer state (sampler_weights checkpoints hold only the adapter); "
                    "load it without the optimizer, or load a weights/ checkpoint"
                )
            optimizer.load_state_dict(loaded.optimizer_state)
            if not optimizer.is_empty():
                optimizer.check_matches(list(loaded.weights.parameters()))
        current = host.served.adapters.get(req.run_id) if req.run_id in self.runtime.runs else None
        if current is not None and (current.config.rank, sorted(current.weights.a)) != (
            loaded.lora.rank,
            sorted(loaded.weights.a),
        ):
            raise InvalidRequestError(
                f"checkpoint {path} (rank {loaded.lora.rank}, {len(loaded.weights.a)} modules) does not fit run "
                f"{req.run_id!r} (rank {current.config.rank}, {len(current.weights.a)} modules)"
            )
        if row is None:
            row = self._ensure_run_row(future.owner, req.run_id, host.name, loaded.lora, req.user_metadata)
        host.served.install_adapter(req.run_id, loaded.lora, loaded.weights, optimizer)
        self.runtime.add_run(LoadedRun(req.run_id, future.owner, row.session_id, host.name))
        return PathResult(path=str(path), model_id=req.run_id, step=optimizer.step)

    # -- helpers -------------------------------------------------------------------------------------------------

    @staticmethod
    def _expiry(now: datetime, ttl_seconds: int | None) -> datetime | None:
        if ttl_seconds is None:
            return None
        try:
            if ttl_seconds <= 0:
                raise ValueError
            return now + timedelta(seconds=ttl_seconds)
        except (ValueError, OverflowError):
            raise InvalidRequestError(f"ttl_seconds must be a positive number of seconds, got {ttl_seconds}") from None

    def _checkpoint_exists(self, path: TinkerPath, owner: str) -> bool:
        try:
            self.store.checkpoints.get(path, owner)
        except NotFoundError:
            return False
        return True

    def _find_run_row(self, run_id: str, owner: str) -> TrainingRun | None:
        try:
            return self.store.runs.get(run_id, owner)
        except NotFoundError:
            return None

    def _ensure_run_row(
        self, owner: str, run_id: str, base_model: str, lora: LoraConfig, user_metadata: JsonObject
    ) -> TrainingRun:
        """The run's row; created here when the api did not (its session is named in our run id format)."""
        row = self._find_run_row(run_id, owner)
        if row is not None:
            return row
        session_id, _ = parse_training_run_id(run_id)
        now = self.clock()
        run = TrainingRun(run_id, session_id, owner, base_model, now, now, lora, user_metadata=dict(user_metadata))
        return self.store.runs.create(run, exist_ok=True)

    def _mark_corrupted(self, run: LoadedRun) -> None:
        try:
            self.store.runs.mark_corrupted(run.run_id, run.owner)
        except Exception:
            log.exception("could not flag training run %s as corrupted", run.run_id)
