"""Checkpoints: exact round trips, PEFT compatibility both ways, atomic replacement, clear errors, merging."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PretrainedConfig

from tests.engine.tiny_models import tiny_config, tiny_model
from tinkerd.domain.errors import InvalidRequestError, NotFoundError
from tinkerd.domain.ops import LoraConfig
from tinkerd.engine import atomic_dir, checkpoint
from tinkerd.engine.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    OPTIMIZER_STATE,
    TINKERD_METADATA,
    check_compatible,
    checkpoint_size_bytes,
    load_checkpoint,
    merge_into,
    save_checkpoint,
)
from tinkerd.engine.lora import LoraRouting, LoraWeights, init_lora_weights
from tinkerd.engine.transformer import Transformer

# PEFT warns about tied lm_head targets and transformers about deprecations: expected here, noise in the report
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SEQ = [1, 5, 9, 33, 4, 7, 8, 9, 60, 2]
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


class SimulatedCrash(BaseException):
    """Like the process dying mid-save: no ``except Exception`` cleanup runs."""


def _trained_weights(model: torch.nn.Module, lora: LoraConfig, seed: int = 0) -> LoraWeights:
    """Fresh weights with non-zero B, so an adapter that is dropped or mis-scaled changes the logits."""
    weights = init_lora_weights(model, lora, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in weights.b.values():
            b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    return weights


def _our_logits(model: torch.nn.Module, weights: LoraWeights) -> torch.Tensor:
    engine = Transformer(model, torch.float32)
    routing = LoraRouting.single(len(SEQ), weights)
    with torch.no_grad():
        return engine.logits(engine.packed_hidden([SEQ], routing), routing)


def _hf_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([SEQ])).logits[0].float()


def _optimizer_state(weights: LoraWeights) -> dict[str, torch.Tensor]:
    state = {f"exp_avg.{i}": torch.randn(p.shape) for i, p in enumerate(weights.parameters())}
    state |= {f"exp_avg_sq.{i}": torch.rand(p.shape) for i, p in enumerate(weights.parameters())}
    return state | {"step": torch.tensor(12)}


def _assert_same_weights(got: LoraWeights, want: LoraWeights) -> None:
    assert (got.rank, got.alpha) == (want.rank, want.alpha)
    assert list(got.a) == list(want.a) and list(got.b) == list(want.b)  # order too: optimizer state is indexed by it
    for name in want.a:
        assert torch.equal(got.a[name], want.a[name].detach()) and torch.equal(got.b[name], want.b[name].detach())


def _side_dirs(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- round trip and format -------------------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model = tiny_model("llama")
    lora = LoraConfig(rank=4, alpha=16.0, seed=7, train_attn=True, train_mlp=False, train_unembed=True)
    weights = _trained_weights(model, lora)
    optimizer_state = _optimizer_state(weights)
    metadata: dict[str, object] = {"run": "run-1", "step": 12, "tags": ["a", "b"], "nested": {"loss": 1.5}}
    dest = tmp_path / "weights" / "step-12"

    save_checkpoint(dest, weights, lora, "tiny/llama", optimizer_state, metadata)
    loaded = load_checkpoint(dest, "cpu", model=model)

    assert sorted(os.listdir(dest)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER_STATE, TINKERD_METADATA]
    assert loaded.lora == lora and loaded.base_model == "tiny/llama" and loaded.metadata == metadata
    _assert_same_weights(loaded.weights, weights)
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in loaded.weights.parameters())
    assert loaded.optimizer_state is not None and loaded.optimizer_state.keys() == optimizer_state.keys()
    for key, value in optimizer_state.items():
        assert torch.equal(loaded.optimizer_state[key], value) and loaded.optimizer_state[key].dtype == value.dtype
    assert loaded.created_at is not None and abs((datetime.now(UTC) - loaded.created_at).total_seconds()) < 60
    assert loaded.extra["sizes"] == {
        "num_parameters": weights.num_parameters(),
        "adapter_bytes": (dest / ADAPTER_WEIGHTS).stat().st_size,
        "optimizer_bytes": (dest / OPTIMIZER_STATE).stat().st_size,
    }
    assert _side_dirs(dest.parent) == []


def test_files_follow_the_peft_layout(tmp_path: Path) -> None:
    model = tiny_model("llama")
    lora = LoraConfig(rank=4, alpha=8.0, seed=1, train_mlp=False, train_unembed=True)
    save_checkpoint(tmp_path / "c", _trained_weights(model, lora), lora, "org/base", None, {})
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "c" / ADAPTER_WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.lora_A.weight" in keys and len(keys) == 2 * (2 * 4 + 1)
    config = json.loads((tmp_path / "c" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, "org/base")
    assert config["target_modules"] == ["k_proj", "lm_head", "o_proj", "q_proj", "v_proj"]
    assert (config["bias"], config["fan_in_fan_out"], config["lora_dropout"], config["use_rslora"]) == (
        "none",
        False,
        0.0,
        False,
    )


def test_sampler_checkpoint_has_no_optimizer_state(tmp_path: Path) -> None:
    model = tiny_model("llama")
    lora = LoraConfig(rank=2, seed=3)
    weights = _trained_weights(model, lora)
    save_checkpoint(tmp_path / "s", weights, lora, "tiny", None, {})
    assert not (tmp_path / "s" / OPTIMIZER_STATE).exists()
    assert load_checkpoint(tmp_path / "s", "cpu").optimizer_state is None
    save_checkpoint(tmp_path / "w", weights, lora, "tiny", _optimizer_state(weights), {})
    assert load_checkpoint(tmp_path / "w", "cpu", load_optimizer=False).optimizer_state is None


# -- PEFT compatibility ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "tie", "lora"),
    [
        ("llama", True, LoraConfig(rank=4, alpha=8.0, seed=1)),  # tied lm_head targeted
        ("llama", True, LoraConfig(rank=4, alpha=8.0, seed=1, train_unembed=False)),
        ("llama", True, LoraConfig(rank=4, alpha=32.0, seed=1, train_mlp=False, train_unembed=False)),
        ("qwen2", False, LoraConfig(rank=3, alpha=5.0, seed=2)),  # untied lm_head, non-integer scale
    ],
)
def test_peft_loads_our_adapter_and_agrees(tmp_path: Path, family: str, tie: bool, lora: LoraConfig) -> None:
    weights = _trained_weights(tiny_model(family, tie=tie), lora)
    save_checkpoint(tmp_path / "c", weights, lora, "tiny", None, {})

    peft_model = PeftModel.from_pretrained(tiny_model(family, tie=tie), str(tmp_path / "c"))
    base = _hf_logits(tiny_model(family, tie=tie))
    ours = _our_logits(tiny_model(family, tie=tie), weights)
    assert (ours - base).abs().max() > 1e-3  # the adapter matters, so agreement below means something
    torch.testing.assert_close(_hf_logits(peft_model), ours, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("targets", "rslora"), [(ALL_TARGETS, False), (["q_proj", "v_proj"], False), (ALL_TARGETS, True)]
)
def test_adapter_saved_by_peft_loads_and_agrees(tmp_path: Path, targets: list[str], rslora: bool) -> None:
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(tiny_model("llama"), peft_config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    expected = _hf_logits(peft_model)

    loaded = load_checkpoint(tmp_path / "peft", "cpu", model=tiny_model("llama"))

    assert {name.rsplit(".", 1)[-1] for name in loaded.weights.a} == set(targets)
    assert loaded.metadata == {} and loaded.optimizer_state is None and loaded.lora.seed is None
    assert (loaded.lora.train_mlp, loaded.lora.train_unembed) == ("up_proj" in targets, "lm_head" in targets)
    assert next(iter(loaded.weights.a)) == "model.layers.0.self_attn.q_proj"  # model order, as init uses
    torch.testing.assert_close(_our_logits(tiny_model("llama"), loaded.weights), expected, atol=2e-5, rtol=1e-4)


# -- atomicity -------------------------------------------------------------------------------------------------------


def _versions(tmp_path: Path) -> tuple[LoraConfig, LoraWeights, LoraWeights]:
    lora = LoraConfig(rank=2, seed=1)
    model = tiny_model("llama")
    return lora, _trained_weights(model, lora, seed=1), _trained_weights(model, lora, seed=2)


def _save(dest: Path, lora: LoraConfig, weights: LoraWeights, step: int) -> None:
    save_checkpoint(dest, weights, lora, "tiny", {"step": torch.tensor(step)}, {"step": step})


def _assert_is(dest: Path, weights: LoraWeights, step: int) -> None:
    loaded = load_checkpoint(dest, "cpu")
    assert loaded.metadata == {"step": step} and loaded.optimizer_state is not None
    assert int(loaded.optimizer_state["step"]) == step
    _assert_same_weights(loaded.weights, weights)


def test_crash_while_writing_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lora, old, new = _versions(tmp_path)
    dest = tmp_path / "ckpt"
    _save(dest, lora, old, 1)
    real_write = checkpoint._write_safetensors

    def die_on_optimizer(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        if path.name == OPTIMIZER_STATE:
            raise SimulatedCrash
        real_write(path, tensors)

    monkeypatch.setattr(checkpoint, "_write_safetensors", die_on_optimizer)
    with pytest.raises(SimulatedCrash):
        _save(dest, lora, new, 2)
    assert len(_side_dirs(tmp_path)) == 1  # the half-written new one, beside the untouched old one
    _assert_is(dest, old, 1)

    monkeypatch.undo()
    _save(dest, lora, new, 2)
    _assert_is(dest, new, 2)
    assert _side_dirs(tmp_path) == []  # the next save swept the crashed one's leftovers


def test_crash_on_first_save_leaves_nothing_at_dest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lora, old, _ = _versions(tmp_path)

    def die(path: Path, data: object) -> None:
        raise SimulatedCrash

    monkeypatch.setattr(checkpoint, "_write_json", die)
    with pytest.raises(SimulatedCrash):
        _save(tmp_path / "ckpt", lora, old, 1)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(NotFoundError):
        load_checkpoint(tmp_path / "ckpt", "cpu")


def test_ordinary_failure_cleans_up_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lora, old, new = _versions(tmp_path)
    _save(tmp_path / "ckpt", lora, old, 1)

    def disk_full(path: Path, data: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_json", disk_full)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path / "ckpt", lora, new, 2)
    assert _side_dirs(tmp_path) == []
    _assert_is(tmp_path / "ckpt", old, 1)


@pytest.mark.skipif(atomic_dir._renameat2() is None, reason="no renameat2 here")
def test_overwrite_swaps_atomically_and_a_crash_at_the_swap_keeps_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora, old, new = _versions(tmp_path)
    dest = tmp_path / "ckpt"
    _save(dest, lora, old, 1)
    swaps: list[bool] = []
    real_exchange = atomic_dir._exchange

    def spy(a: Path, b: Path) -> bool:
        swaps.append(real_exchange(a, b))
        return swaps[-1]

    monkeypatch.setattr(atomic_dir, "_exchange", spy)
    _save(dest, lora, new, 2)
    assert swaps == [True]  # this filesystem swapped: dest was never missing
    _assert_is(dest, new, 2)

    def die(a: Path, b: Path) -> bool:
        raise SimulatedCrash

    monkeypatch.setattr(atomic_dir, "_exchange", die)
    with pytest.raises(SimulatedCrash):
        _save(dest, lora, old, 3)
    _assert_is(dest, new, 2)


def test_without_atomic_swap_a_crash_between_renames_recovers_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lora, old, new = _versions(tmp_path)
    dest = tmp_path / "ckpt"
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)  # as on macOS or a filesystem without it
    _save(dest, lora, old, 1)
    _save(dest, lora, new, 2)  # the fallback overwrites too
    _assert_is(dest, new, 2)

    real_rename = os.rename
    renames: list[str] = []

    def die_on_second_rename(src: str | Path, dst: str | Path) -> None:
        renames.append(str(dst))
        if len(renames) == 2:
            raise SimulatedCrash
        real_rename(src, dst)

    monkeypatch.setattr(atomic_dir.os, "rename", die_on_second_rename)
    with pytest.raises(SimulatedCrash):
        _save(dest, lora, old, 3)
    monkeypatch.setattr(atomic_dir.os, "rename", real_rename)
    assert not dest.exists()  # the window the fallback cannot close; the parked copy is recovered on next use
    _assert_is(dest, new, 2)
    _save(dest, lora, old, 3)
    _assert_is(dest, old, 3)
    assert _side_dirs(tmp_path) == []


def test_sweep_spares_fresh_neighbours_and_parked_only_copies(tmp_path: Path) -> None:
    lora, old, _ = _versions(tmp_path)
    hex32 = "0" * 32
    stale_tmp, fresh_tmp = tmp_path / f".a.tinkerd-tmp-{hex32}", tmp_path / f".b.tinkerd-tmp-{hex32}"
    parked = tmp_path / f".c.tinkerd-old-{hex32}"  # c itself is missing: this is the only copy of c
    for path in (stale_tmp, fresh_tmp, parked):
        path.mkdir()
    an_hour_ago = time.time() - 2 * atomic_dir.STALE_AFTER_S
    for path in (stale_tmp, parked):
        os.utime(path, (an_hour_ago, an_hour_ago))
    _save(tmp_path / "ckpt", lora, old, 1)
    assert _side_dirs(tmp_path) == [fresh_tmp.name, parked.name]


# -- errors ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    lora = LoraConfig(rank=2, seed=1)
    weights = _trained_weights(tiny_model("llama"), lora)
    save_checkpoint(tmp_path / "ckpt", weights, lora, "tiny", _optimizer_state(weights), {})
    return tmp_path / "ckpt"


def test_missing_checkpoint_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope", "cpu")
    with pytest.raises(NotFoundError):
        checkpoint_size_bytes(tmp_path / "nope")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / ADAPTER_WEIGHTS).write_bytes(b"\x00garbage"), "adapter_model.safetensors is corrupt"),
        (lambda d: (d / OPTIMIZER_STATE).write_bytes((d / OPTIMIZER_STATE).read_bytes()[:50]), "optimizer.*corrupt"),
        (lambda d: (d / ADAPTER_CONFIG).unlink(), "missing adapter_config.json"),
        (lambda d: (d / TINKERD_METADATA).write_text("{not json"), "not valid JSON"),
        (lambda d: _edit_json(d / ADAPTER_CONFIG, use_dora=True), "use_dora"),
        (lambda d: _edit_json(d / ADAPTER_CONFIG, r=3), "disagree"),
        (lambda d: _edit_json(d / TINKERD_METADATA, format_version=99), "format_version"),
    ],
)
def test_damaged_checkpoints_are_rejected_clearly(saved: Path, damage: Callable[[Path], object], message: str) -> None:
    damage(saved)
    with pytest.raises(InvalidRequestError, match=message):
        load_checkpoint(saved, "cpu")


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_adapter_for_a_different_base_shape_is_rejected(saved: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"lm_head.*\[96 x 64\].*\[128 x 64\]"):
        load_checkpoint(saved, "cpu", model=tiny_model("llama", vocab_size=128))
    config = tiny_config("llama")
    config.num_hidden_layers = 1
    shallower = AutoModelForCausalLM.from_config(config)
    with pytest.raises(InvalidRequestError, match=r"model\.layers\.1\..*no linear layer"):
        check_compatible(load_checkpoint(saved, "cpu").weights, shallower)


def test_metadata_must_be_json(tmp_path: Path) -> None:
    lora = LoraConfig(rank=2, seed=1)
    weights = _trained_weights(tiny_model("llama"), lora)
    with pytest.raises(InvalidRequestError, match="JSON"):
        save_checkpoint(tmp_path / "c", weights, lora, "tiny", None, {"bad": float("nan")})
    assert list(tmp_path.iterdir()) == []


# -- merging and sizes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "tie"), [("llama", True), ("qwen2", False)])
def test_merged_model_equals_the_adapter(family: str, tie: bool) -> None:
    lora = LoraConfig(rank=4, alpha=8.0, seed=2)
    weights = _trained_weights(tiny_model(family, tie=tie), lora)
    expected = _our_logits(tiny_model(family, tie=tie), weights)
    merged = tiny_model(family, tie=tie)
    embedding_before = _input_embedding(merged).detach().clone()

    merge_into(merged, weights)

    torch.testing.assert_close(_hf_logits(merged), expected, atol=2e-5, rtol=1e-4)
    # a tied head is untied first, or merging lm_head's delta would also shift every input embedding
    assert torch.equal(_input_embedding(merged), embedding_before)
    if tie:  # and stays untied, should the merged model be saved or re-tied
        config = merged.config
        assert isinstance(config, PretrainedConfig) and config.tie_word_embeddings is False


def _input_embedding(model: torch.nn.Module) -> torch.Tensor:
    embed = model.get_submodule("model.embed_tokens")
    assert isinstance(embed, torch.nn.Embedding)
    return embed.weight


def test_checkpoint_size_is_the_sum_of_its_files(saved: Path) -> None:
    assert checkpoint_size_bytes(saved) == sum(p.stat().st_size for p in saved.iterdir())
    assert checkpoint_size_bytes(saved / ADAPTER_WEIGHTS) == (saved / ADAPTER_WEIGHTS).stat().st_size
