"""One served base model as the worker drives it: the trainer (``ServedModel``), its sampler, and a text decoder.

Built once by the composition root (loading weights takes seconds) and then used only on the worker's thread.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from tinkerd.domain.architectures import EnginePath
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.decode_layout import use_decode_layout
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.generic_sampler import GenericSampler
from tinkerd.engine.hybrid_sampler import HybridSampler
from tinkerd.engine.model_paths import Forward, load_hf_model, load_image_processor, packed_forward, path_of
from tinkerd.engine.qwen3_5 import HybridTransformer
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.served_model import ServedModel
from tinkerd.engine.transformer import Transformer
from tinkerd.engine.vllm import VllmBackend, VllmSampler

log = logging.getLogger(__name__)

DecodeText = Callable[[list[int]], str]
# Builds the trainer of a base model: ServedModel, or a distributed trainer's rank 0 (engine/distributed).
MakeServed = Callable[[str, torch.nn.Module, EngineConfig], ServedModel]


class ModelHost:
    """A base model's engines. The sampler can be rebuilt (after a failed step) without touching the adapters."""

    def __init__(self, served: ServedModel, sample_transformer: Forward, decode_text: DecodeText | None = None) -> None:
        self.served = served
        self.sample_transformer = sample_transformer
        self.decode_text = decode_text
        self.vllm: VllmBackend | None = None  # set: sampling runs on this supervised vLLM engine instead
        self.sampler: Sampler | VllmSampler = self.new_sampler()

    @property
    def name(self) -> str:
        return self.served.name

    @property
    def engine_path(self) -> EnginePath:
        return EnginePath.GENERIC if isinstance(self.sample_transformer, GenericTransformer) else EnginePath.PACKED

    def new_sampler(self) -> Sampler | VllmSampler:
        batch = self.served.config.max_decode_batch
        # A sharded trainer cannot score alone: the sampler's own copy, kept in the training dtype, scores instead.
        train = self.served.train if not self.served.config.shard_base else self.sample_transformer
        if self.vllm is not None:
            # samples report the trainer's logprobs, as the builtin sampler's do (a packed trainer rescores)
            scorer = train if isinstance(train, Transformer) else None
            return VllmSampler(self.vllm, self.sample_transformer.shape, self.decode_text, scorer)
        if isinstance(self.sample_transformer, GenericTransformer):
            return GenericSampler(self.sample_transformer, self.decode_text, max_batch=batch)
        # samples report the trainer's logprobs (engine/rescoring.py); a packed sampler has a packed trainer
        scorer = train if self.served.config.rescore_samples and isinstance(train, Transformer) else None
        if isinstance(self.sample_transformer, HybridTransformer):
            return HybridSampler(self.sample_transformer, self.decode_text, max_batch=batch, scorer=scorer)
        return Sampler(self.sample_transformer, self.decode_text, max_batch=batch, scorer=scorer)

    def use_vllm(self, backend: VllmBackend) -> None:
        """Sample on ``backend`` from now on (the builtin sampler and its cache are dropped)."""
        self.vllm = backend
        self.sampler = self.new_sampler()

    def reset_sampler(self) -> None:
        """Drop every queued and running sequence (after a step raised: the sampler's state is no longer known)."""
        self.sampler = self.new_sampler()

    @staticmethod
    def from_model(
        name: str,
        hf_model: torch.nn.Module,
        config: EngineConfig,
        decode_text: DecodeText | None = None,
        make_served: MakeServed = ServedModel,
        image_processor: Any = None,
    ) -> ModelHost:
        """Host an already loaded fp32 Hugging Face model (tests, or callers that build models themselves); a
        vision-language model takes images with its ``image_processor``."""
        sample_hf = None
        if path_of(hf_model) is EnginePath.GENERIC:
            # one copy in the training dtype serves both, so the sampler's logprobs are the trainer's exactly
            if image_processor is not None and make_served is not ServedModel:
                raise ValueError(f"{name}: a vision-language model trains on one rank (--ranks 1)")
            served = (
                ServedModel(name, hf_model, config, image_processor)
                if image_processor
                else make_served(name, hf_model, config)
            )
            return ModelHost(served, served.train, decode_text)
        if config.shard_base and not config.sampling:
            pass  # a sharded trainer that never samples (tinkerd trainer) holds its shard and nothing else
        elif config.sample_torch_dtype != config.train_torch_dtype or config.shard_base:
            # Copy before ServedModel casts the original to the training dtype: a bf16 copy cast back up to fp32
            # would sample from rounded weights. A sharded trainer keeps a slice of each weight: rank 0 samples
            # from a whole copy of its own.
            sample_hf = copy.deepcopy(hf_model)
        served = make_served(name, hf_model, config)
        if sample_hf is None:
            sample = served.train  # one copy of the weights serves both; its layout must stay trainable
        else:
            sample = packed_forward(sample_hf, config.sample_torch_dtype)
            if config.decode_layout:
                # the sampler's own copy is never trained: store it the way decode reads it (about 2x faster gemv)
                use_decode_layout(sample)
        return ModelHost(served, sample, decode_text)

    @staticmethod
    def from_directory(name: str, path: Path, config: EngineConfig, make_served: MakeServed = ServedModel) -> ModelHost:
        """Load a Hugging Face model directory; its tokenizer (if any) decodes text for stop strings."""
        hf_model = load_hf_model(path, config.torch_device)
        return ModelHost.from_model(name, hf_model, config, load_decoder(path), make_served, load_image_processor(path))


def load_decoder(path: Path) -> DecodeText | None:
    """The tokenizer's decode, or None when the directory has no usable tokenizer (stop strings are then refused)."""
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no tokenizer in %s (%s): stop strings will be refused for this model", path, exc)
        return None

    def decode_text(tokens: list[int]) -> str:
        # Special tokens stay in the text so that a stop string naming one (e.g. "<|im_end|>") can match.
        return str(tokenizer.decode(tokens, skip_special_tokens=False))

    return decode_text
