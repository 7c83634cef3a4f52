"""Turn a GGUF file into a plain Hugging Face model directory (fp32 safetensors + tokenizer).

transformers reads GGUF through the `gguf` package and dequantises the weights to fp32. We save fp32, not the
original bf16: the dequantised Q4_1 values are not all representable in bf16, and fp32 keeps the saved model
bit-identical to what transformers loads from the GGUF. Engines cast to bf16 themselves where it pays.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PretrainedConfig

from tinkerd.domain.errors import ModelFetchError

# Keys the GGUF loader leaves in a config that must not reach a plain safetensors model: a quantization_config
# would make transformers look for a quantizer, and "_model_name_or_path" is the GGUF's `general.name`.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_model_name_or_path")
# Written by save_pretrained from loading arguments, they describe how this copy was loaded, not the tokenizer.
_LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only", "gguf_file")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' tqdm bars and deprecation chatter; our own progress display replaces them.

    The GGUF loader's "de-quantizing" bar ignores transformers' progress switch and writes to whatever
    sys.stderr is, so stderr is swapped out too (our display holds a reference to the real one).
    """
    utils_logging = transformers.utils.logging
    bars_were_enabled = utils_logging.is_progress_bar_enabled()
    verbosity = utils_logging.get_verbosity()
    utils_logging.disable_progress_bar()
    utils_logging.set_verbosity(logging.ERROR)
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        utils_logging.set_verbosity(verbosity)
        if bars_were_enabled:
            utils_logging.enable_progress_bar()


def _plain_config(gguf_config: PretrainedConfig, repo_id: str) -> PretrainedConfig:
    values = gguf_config.to_dict()
    for key in _GGUF_ONLY_CONFIG_KEYS:
        values.pop(key, None)
    values["dtype"] = "float32"
    # GGUF stores floats as float32, so 1e-5 comes back as 9.999999747378752e-06. Rounding restores the value the
    # original config says; both are the same float32, so the model computes exactly the same thing.
    eps = values.get("rms_norm_eps")
    if isinstance(eps, float):
        values["rms_norm_eps"] = float(f"{eps:.7g}")
    config = type(gguf_config).from_dict(values)
    config._name_or_path = repo_id
    return config


def convert_weights(gguf_path: Path, out_dir: Path, *, repo_id: str) -> None:
    """Write config.json, generation_config.json and model.safetensors (fp32) for the GGUF's model."""
    with _quiet_transformers():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
        )
        # A GGUF-loaded model carries a quantizer that refuses save_pretrained, so its weights move into a model
        # built from the plain config. Building it on the meta device and assigning the loaded tensors costs
        # neither a random initialisation nor a copy.
        config = _plain_config(gguf_model.config, repo_id)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
        # Assigning replaced lm_head.weight and embed_tokens.weight separately: tie them again so the checkpoint
        # stores one matrix and a reload shares it, as the original model does.
        model.tie_weights()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=getattr(config, "pad_token_id", None),
        )
        model.save_pretrained(out_dir)
    if getattr(config, "tie_word_embeddings", False):
        _check_single_embedding(out_dir / "model.safetensors")


def _check_single_embedding(safetensors_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(safetensors_path), framework="pt") as tensors:
        if "lm_head.weight" in tensors.keys():  # noqa: SIM118 (safe_open supports no `in`)
            raise ModelFetchError("tied embeddings were saved twice; the converted model would untie on reload")


def convert_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Write the tokenizer files next to the converted config (which must already be in `out_dir`)."""
    config = json.loads((out_dir / "config.json").read_text())
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        tokenizer.save_pretrained(out_dir)
    _tidy_tokenizer_config(out_dir / "tokenizer_config.json", config)
    _check_tokenizer(out_dir, config)


def _tidy_tokenizer_config(path: Path, model_config: dict[str, object]) -> None:
    values = json.loads(path.read_text())
    for key in _LOAD_TIME_TOKENIZER_KEYS:
        values.pop(key, None)
    # transformers 5 names its generic fast class "TokenizersBackend", which transformers 4.x (still common on
    # the client side) cannot import. Every GGUF byte-level BPE tokenizer is a GPT-2 style tokenizer, which both
    # major versions load from tokenizer.json with identical results (tests check this).
    if values.get("tokenizer_class") == "TokenizersBackend":
        values["tokenizer_class"] = "GPT2Tokenizer"
    # Without a limit transformers writes 1e30 and never warns about over-long inputs.
    max_positions = model_config.get("max_position_embeddings")
    if isinstance(max_positions, int):
        values["model_max_length"] = max_positions
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _check_tokenizer(out_dir: Path, model_config: dict[str, object]) -> None:
    """Reload what was written and fail loudly on the mistakes that would silently spoil training."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if not tokenizer.chat_template:
        raise ModelFetchError(f"the converted tokenizer in {out_dir} lost its chat template")
    for role in ("bos", "eos"):
        expected = model_config.get(f"{role}_token_id")
        found = getattr(tokenizer, f"{role}_token_id")
        if expected is not None and found != expected:
            raise ModelFetchError(f"tokenizer {role} id {found} differs from the model config's {expected}")
