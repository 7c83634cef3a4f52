"""Exporting a checkpoint for the tools users run next: a PEFT adapter directory, or a full model with the LoRA merged.

- ``export_peft``: the checkpoint's ``adapter_config.json`` + ``adapter_model.safetensors``, byte for byte (they are
  already what PEFT and vLLM load; see ``checkpoint``), without our optimizer state and metadata.
- ``export_merged``: the base model with ``W + scale * B @ A`` folded into every adapted linear layer
  (``checkpoint.merge_into``), saved by ``save_pretrained`` as safetensors, plus the base model's tokenizer files, so
  ``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` load it.

Both build the export in a hidden sibling of ``out`` and move it into place only once complete, so a failed or
interrupted export never leaves a half-written directory that looks like a model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tinkerd.domain.errors import ConflictError, InvalidRequestError
from tinkerd.engine import atomic_dir, gpt_oss_peft
from tinkerd.engine.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_checkpoint, merge_into
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.lora_targets import EXPERT_PROJECTIONS, is_expert_param

# (what is happening, steps done, steps in all): called as an export moves on, for a progress bar.
ExportProgress = Callable[[str, int, int], None]

# Files of a Hugging Face model directory that describe its tokenizer; copied into a merged export as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MERGED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _no_progress(_what: str, _done: int, _total: int) -> None:
    pass


def export_peft(
    checkpoint_dir: Path, out: Path, *, overwrite: bool = False, base_model_type: str | None = None
) -> list[Path]:
    """Write ``checkpoint_dir``'s LoRA adapter as a plain PEFT adapter directory at ``out``; the files written.

    Refuses (InvalidRequestError) an adapter of MoE experts that also adapts other ``gate_proj``/``up_proj``/
    ``down_proj`` layers (Qwen2-MoE's shared expert): PEFT (0.21, with transformers 5) reads every such target of
    these models as the experts' and would silently drop the others. Export a merged model for those.

    An adapter of GPT-OSS's experts (``base_model_type`` "gpt_oss": the base model's config ``model_type``, when the
    caller knows it) is rewritten onto PEFT's LoRA of the fused expert parameters (``gpt_oss_peft``): PEFT has no
    per-expert modules for GPT-OSS. Without ``base_model_type`` the checkpoint's per-expert form is written, which
    PEFT reads for Qwen2-MoE and Qwen3-MoE only."""
    loaded = load_checkpoint(checkpoint_dir, "cpu", load_optimizer=False)  # a corrupt checkpoint fails here, clearly
    names = list(loaded.weights.a)
    experts = any(is_expert_param(n) for n in names)
    if experts and base_model_type == "gpt_oss":
        config = json.loads((checkpoint_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        tensors, peft_config = gpt_oss_peft.peft_adapter(loaded.weights, config)
        _check_out(out, overwrite)

        def write_converted(tmp: Path) -> None:
            save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n", "utf-8")
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
                atomic_dir.fsync(tmp / name)

        return _build(out, write_converted)
    if experts:
        shadowed = [n for n in names if not is_expert_param(n) and n.rsplit(".", 1)[-1] in EXPERT_PROJECTIONS]
        if shadowed:
            raise InvalidRequestError(
                f"this adapter trains MoE experts and also {shadowed[0]!r} (a shared expert or dense MLP), which PEFT "
                "would drop when it loads it onto transformers 5's fused experts: export a merged model instead"
            )
    _check_out(out, overwrite)

    def write(tmp: Path) -> None:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(checkpoint_dir / name, tmp / name)
            atomic_dir.fsync(tmp / name)

    return _build(out, write)


def export_merged(
    checkpoint_dir: Path,
    base_model_dir: Path,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: ExportProgress = _no_progress,
) -> list[Path]:
    """Write the base model at ``base_model_dir`` with the checkpoint's adapter merged in, as a Hugging Face model
    directory at ``out`` in ``dtype``; the files written.

    The merge adds in fp32 and rounds once to ``dtype``. The default fp32 keeps small adapter deltas that bf16 weights
    would round away.
    """
    _check_out(out, overwrite)
    loaded = load_checkpoint(checkpoint_dir, "cpu", load_optimizer=False)
    modules = list(loaded.weights.a)
    total = len(modules) + 3  # read the base, merge each module, save, copy the tokenizer
    progress("reading the base model", 0, total)
    model = _load_base(base_model_dir, dtype)
    for i, name in enumerate(modules):
        progress(f"merging {name}", 1 + i, total)
        merge_into(model, _one_module(loaded.weights, name))
    progress("writing safetensors", 1 + len(modules), total)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        progress("copying the tokenizer", 2 + len(modules), total)
        for name in TOKENIZER_FILES:
            if (base_model_dir / name).is_file():
                shutil.copyfile(base_model_dir / name, tmp / name)
        for path in tmp.iterdir():
            atomic_dir.fsync(path)

    files = _build(out, write)
    progress("done", total, total)
    return files


def _load_base(base_model_dir: Path, dtype: torch.dtype) -> Any:  # a PreTrainedModel (transformers types it loosely)
    from transformers import AutoModelForCausalLM  # slow to import: only when merging

    if not (base_model_dir / "config.json").is_file():
        raise InvalidRequestError(f"{base_model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidRequestError(f"cannot load the base model from {base_model_dir}: {exc}") from None
    model.eval()
    return model


def _one_module(weights: LoraWeights, name: str) -> LoraWeights:
    # merge_into checks a whole adapter before touching the model; one module at a time lets a progress bar move
    # on big models, and every module is still checked before it changes.
    return LoraWeights(weights.rank, weights.alpha, {name: weights.a[name]}, {name: weights.b[name]})


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConflictError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConflictError(f"{out} exists and is not empty; choose another directory or replace it (--force)")


def _build(out: Path, write: Callable[[Path], None]) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_dir.side_dir(out, "tmp")
    tmp.mkdir()
    try:
        write(tmp)
        atomic_dir.fsync_dir(tmp)
        atomic_dir.install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(path for path in out.iterdir() if path.is_file())
