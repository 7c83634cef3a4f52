"""The engine's typed configuration: built once by the CLI from settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinkerd.domain.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPES |= {"float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    # Training and scoring run the frozen base in this dtype (bf16 matmuls are ~5x faster on this CPU's AMX).
    train_dtype: str = "bfloat16"
    # Decoding reads every weight per token, so it is memory bound; on CPU fp32 gemv beats bf16 gemv.
    sample_dtype: str = "float32"
    # Upper bound of tokens in one forward/backward pass; larger requests run as several passes.
    max_tokens_per_pass: int = 8192
    # Sequences decoded together by the sampler.
    max_decode_batch: int = 64
    num_threads: int | None = None
    # Re-store the sampling copy's weights for decoding (oneDNN-packed on CPU); see engine/decode_layout.py.
    decode_layout: bool = True

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def train_torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.train_dtype)

    @property
    def sample_torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.sample_dtype)
