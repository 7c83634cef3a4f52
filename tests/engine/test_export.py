"""Exported checkpoints load in the tools users take them to, and compute what the served adapter computes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.engine.tiny_models import tiny_model
from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ops import LoraConfig
from tinkerd.engine.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_checkpoint, save_checkpoint
from tinkerd.engine.export import export_merged, export_peft
from tinkerd.engine.lora import LoraRouting, init_lora_weights
from tinkerd.engine.transformer import Transformer

# PEFT warns about tied lm_head targets and transformers about deprecations: expected here, noise in the report
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SEQ = [1, 5, 9, 33, 4, 7, 8, 9, 60, 2]
VOCAB = 96


def write_tiny_model_dir(dest: Path, family: str = "llama", tie: bool = True) -> Path:
    """A tiny random model saved as a Hugging Face directory, with a small word-level tokenizer beside it."""
    model: Any = tiny_model(family, tie=tie)
    model.save_pretrained(dest)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]  # the tokenizers stubs type it read-only
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(dest)
    return dest


def write_checkpoint(
    dest: Path, base_dir: Path, lora: LoraConfig, *, with_optimizer: bool, seed: int = 0
) -> torch.Tensor:
    """A checkpoint with non-zero B (so a dropped or mis-scaled adapter shows); returns the served logits of SEQ."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    weights = init_lora_weights(base, lora, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in weights.b.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    optimizer = {f"exp_avg.{i}": torch.randn(p.shape) for i, p in enumerate(weights.parameters())}
    save_checkpoint(dest, weights, lora, str(base_dir), optimizer if with_optimizer else None, {"step": 3})
    return served_logits(base_dir, dest)


def served_logits(base_dir: Path, checkpoint_dir: Path) -> torch.Tensor:
    """What the engine computes for SEQ with the checkpoint loaded, as the server loads it."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    weights = load_checkpoint(checkpoint_dir, "cpu", model=base).weights
    engine = Transformer(base, torch.float32)
    routing = LoraRouting.single(len(SEQ), weights)
    with torch.no_grad():
        return engine.logits(engine.packed_hidden([SEQ], routing), routing)


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([SEQ])).logits[0].float()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.mark.parametrize("kind", ["weights", "sampler_weights"])
def test_peft_export_loads_in_peft_with_the_served_logits(tmp_path: Path, base_dir: Path, kind: str) -> None:
    checkpoint = tmp_path / kind / "step-3"
    expected = write_checkpoint(
        checkpoint, base_dir, LoraConfig(rank=4, alpha=8.0, seed=1), with_optimizer=kind == "weights"
    )
    out = tmp_path / "peft-out"

    files = export_peft(checkpoint, out)

    assert [f.name for f in files] == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # no optimizer state, no tinkerd metadata
    base_only = hf_logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    assert (expected - base_only).abs().max() > 1e-3  # the adapter matters, so agreement below means something
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out)
    torch.testing.assert_close(hf_logits(peft_model), expected, atol=2e-5, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the build dir is gone


@pytest.mark.parametrize(
    ("family", "tie", "kind"),
    [("llama", True, "weights"), ("llama", True, "sampler_weights"), ("qwen2", False, "weights")],
)
def test_merged_export_loads_with_from_pretrained_and_matches(
    tmp_path: Path, family: str, tie: bool, kind: str
) -> None:
    base = write_tiny_model_dir(tmp_path / "base", family, tie)
    checkpoint = tmp_path / kind / "final"
    lora = LoraConfig(rank=4, alpha=8.0, seed=2)  # attention, MLP and the (possibly tied) head
    expected = write_checkpoint(checkpoint, base, lora, with_optimizer=kind == "weights", seed=1)
    out = tmp_path / "merged"
    seen: list[tuple[str, int, int]] = []

    files = export_merged(checkpoint, base, out, progress=lambda what, done, total: seen.append((what, done, total)))

    names = {f.name for f in files}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "optimizer.safetensors"}
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(hf_logits(merged), expected, atol=2e-5, rtol=1e-4)
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())
    # the tokenizer comes along, so the directory is a complete model for transformers, vLLM or llama.cpp converters
    text = "w5 w9 w33"
    ids = AutoTokenizer.from_pretrained(out)(text).input_ids
    assert ids == AutoTokenizer.from_pretrained(base)(text).input_ids
    assert ids == [5, 9, 33] or family != "llama"  # (transformers maps a qwen2 config to its own tokenizer class)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    # progress moves forward to the end, one step per merged module
    assert [done for _, done, _ in seen] == sorted(done for _, done, _ in seen)
    assert seen[-1][1] == seen[-1][2] == len(load_checkpoint(checkpoint, "cpu").weights.a) + 3


def test_merged_export_in_bfloat16(tmp_path: Path, base_dir: Path) -> None:
    checkpoint = tmp_path / "c"
    expected = write_checkpoint(checkpoint, base_dir, LoraConfig(rank=2, alpha=4.0, seed=3), with_optimizer=False)

    export_merged(checkpoint, base_dir, tmp_path / "bf16", dtype=torch.bfloat16)

    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    torch.testing.assert_close(hf_logits(merged), expected, atol=0.1, rtol=0.05)  # bf16 rounding of every weight


def test_export_refuses_a_non_empty_out_dir_unless_told(tmp_path: Path, base_dir: Path) -> None:
    checkpoint = tmp_path / "c"
    write_checkpoint(checkpoint, base_dir, LoraConfig(rank=2, seed=1), with_optimizer=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(ConflictError, match="not empty"):
        export_peft(checkpoint, out)
    with pytest.raises(ConflictError, match="not empty"):
        export_merged(checkpoint, base_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    export_peft(checkpoint, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_peft(checkpoint, empty)  # an empty directory is fine
    assert (empty / ADAPTER_WEIGHTS).is_file()


def test_export_errors_name_the_problem_and_write_nothing(tmp_path: Path, base_dir: Path) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        export_peft(tmp_path / "missing", tmp_path / "out")
    checkpoint = tmp_path / "c"
    write_checkpoint(checkpoint, base_dir, LoraConfig(rank=2, seed=1), with_optimizer=False)
    wider = write_tiny_model_dir(tmp_path / "other-base")
    config = json.loads((wider / "config.json").read_text())
    config["vocab_size"] = 128
    (wider / "config.json").write_text(json.dumps(config))
    AutoModelForCausalLM.from_pretrained(wider, ignore_mismatched_sizes=True).save_pretrained(wider)
    with pytest.raises(InvalidRequestError, match="different base model"):
        export_merged(checkpoint, wider, tmp_path / "out")
    with pytest.raises(InvalidRequestError, match=r"no config\.json"):
        export_merged(checkpoint, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
