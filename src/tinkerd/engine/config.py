"""The engine's typed configuration: built once by the CLI from settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinkerd.domain.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_DTYPES |= {"float16": torch.float16, "fp16": torch.float16}


AUTO = "auto"


def parse_dtype(name: str, device: str = "cpu") -> torch.dtype:
    if name.lower() == AUTO:
        return auto_dtype(device)
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {name!r}; use one of auto, float32, bfloat16, float16") from None


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 matrices natively, and what the answer rests on (for the start-up log).

    On a CPU without AMX or AVX512-BF16 (e.g. AVX2 only) a bf16 matmul is emulated: measured about 100x slower than
    fp32 on such a machine, so bf16 there would only cost speed and precision."""
    kind = torch.device(device).type
    if kind == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "CUDA device without bf16"
    if kind == "cpu":
        if torch.cpu._is_amx_tile_supported():  # pyright: ignore[reportPrivateUsage]
            return True, "CPU with AMX"
        if torch.cpu._is_avx512_bf16_supported():  # pyright: ignore[reportPrivateUsage]
            return True, "CPU with AVX512-BF16"
        return False, f"CPU without native bf16 matmul ({torch.backends.cpu.get_cpu_capability()})"
    return False, f"{kind} device"


def auto_dtype(device: str) -> torch.dtype:
    """bf16 for the frozen base where the device computes it natively, fp32 elsewhere."""
    return torch.bfloat16 if native_bf16(device)[0] else torch.float32


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    # Training and scoring run the frozen base in this dtype. "auto": bf16 where the device has native bf16 matmuls
    # (CUDA, CPUs with AMX or AVX512-BF16: ~2-5x faster than fp32 there), fp32 elsewhere (see native_bf16).
    train_dtype: str = AUTO
    # Decoding reads every weight per token, so it is memory bound; on CPU fp32 gemv beats bf16 gemv.
    sample_dtype: str = "float32"
    # Upper bound of tokens in one forward/backward pass; larger requests run as several passes.
    max_tokens_per_pass: int = 8192
    # Sequences decoded together by the sampler.
    max_decode_batch: int = 64
    num_threads: int | None = None
    # Samples report the training forward's logprobs (engine/rescoring.py); False: the decoder's own values.
    rescore_samples: bool = True
    # Re-store the sampling copy's weights for decoding (oneDNN-packed on CPU); see engine/decode_layout.py.
    decode_layout: bool = True
    # The frozen base is sharded across the trainer's ranks (FSDP2, engine/distributed/sharding.py), not replicated.
    shard_base: bool = False
    # False: this process never samples (a split deployment's trainer), so it keeps no sampling copy of a sharded base.
    sampling: bool = True

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def train_torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.train_dtype, self.device)

    def train_dtype_note(self) -> str:
        """One line for the start-up log: the training dtype in force, and why when it was chosen automatically."""
        chosen = str(self.train_torch_dtype).removeprefix("torch.")
        if self.train_dtype.lower() != AUTO:
            return f"training dtype {chosen}"
        return f"training dtype {chosen} (auto: {native_bf16(self.device)[1]})"

    @property
    def sample_torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.sample_dtype, self.device)
