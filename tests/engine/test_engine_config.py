"""The engine's dtype setting: "auto" picks bf16 only where the device multiplies it natively."""

from __future__ import annotations

import pytest
import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.engine.config import EngineConfig, native_bf16, parse_dtype


def test_auto_is_the_default_and_follows_the_hardware() -> None:
    config = EngineConfig()
    assert config.train_dtype == "auto"
    native, why = native_bf16("cpu")
    assert config.train_torch_dtype == (torch.bfloat16 if native else torch.float32)
    assert why in config.train_dtype_note()
    assert config.train_dtype_note().startswith("training dtype bfloat16" if native else "training dtype float32")


def test_auto_on_cpu_agrees_with_the_cpu_flags() -> None:
    flags = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()  # pyright: ignore[reportPrivateUsage]
    assert native_bf16("cpu")[0] == flags


def test_explicit_dtypes_are_kept_whatever_the_hardware() -> None:
    assert EngineConfig(train_dtype="bfloat16").train_torch_dtype == torch.bfloat16
    assert EngineConfig(train_dtype="fp32").train_torch_dtype == torch.float32
    assert EngineConfig(train_dtype="bfloat16").train_dtype_note() == "training dtype bfloat16"


def test_an_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(InvalidRequestError, match="auto, float32, bfloat16, float16"):
        parse_dtype("int8")
