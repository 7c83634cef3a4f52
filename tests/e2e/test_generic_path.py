"""The issue's own case through the real SDK: a tiny random Qwen3-MoE served by `tinkerd serve` (the packed path, LoRA
on its experts, router load metrics) trains, samples and saves, and so do a GPT-OSS (attention sinks, sliding windows,
experts) and a Qwen3.5 (gated delta-net layers beside full attention), both on the packed path too, and a Phi on the
generic path; a model neither path can serve is refused at start with its architecture named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinker
from tinker import types

from tests.e2e.conftest import API_KEY, SMOLLM2_VOCAB, TOKENIZER_FILES, start_server, stop_server

PROMPT = [1, 17, 300, 4000, 42, 7, 99, 512, 8]


@pytest.fixture(scope="module", params=["qwen3_moe", "phi", "qwen3_5", "gpt_oss"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_source: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.engine.tiny_models import tiny_generic_config, tiny_hybrid_config, tiny_moe_config

    family = str(request.param)
    out = tmp_path_factory.mktemp("models") / f"tiny-{family}"
    if family == "qwen3_moe":
        config = tiny_moe_config(family, vocab_size=SMOLLM2_VOCAB)
    elif family == "qwen3_5":
        config = tiny_hybrid_config(family, vocab_size=SMOLLM2_VOCAB)
    else:
        config = tiny_generic_config(family, vocab_size=SMOLLM2_VOCAB)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, out / name)
    return out


def _datum(tokens: list[int]) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def test_each_family_trains_and_samples_through_the_sdk(tmp_path: Path, model_dir: Path) -> None:
    # the packed mixture-of-experts families, and their number of experts (each token takes 2)
    experts = {"tiny-qwen3_moe": 8, "tiny-gpt_oss": 4}.get(model_dir.name, 0)
    moe = experts > 0
    # GPT-OSS's tiny model overshoots at 2e-2 (Adam's first steps are full-size sign steps on every LoRA entry)
    lr = 2e-3 if model_dir.name == "tiny-gpt_oss" else 2e-2
    server = start_server(tmp_path, model_dir)
    service = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    try:
        import httpx

        capabilities = httpx.get(f"{server.url}/api/v1/get_server_capabilities", headers={"X-API-Key": API_KEY})
        (listed,) = capabilities.json()["supported_models"]
        packed = moe or model_dir.name == "tiny-qwen3_5"  # GPT-OSS is among the MoE
        assert (listed["model_name"], listed["engine_path"]) == (server.model, "packed" if packed else "generic")
        training = service.create_lora_training_client(base_model=server.model, rank=4, seed=1).result()
        before = training.forward([_datum(PROMPT)], "cross_entropy").result().metrics["loss:sum"]
        for _ in range(4):
            step = training.forward_backward([_datum(PROMPT)], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=lr)).result()
            if moe:  # the router's load-balancing statistics of the step's tokens
                assert 0.0 < step.metrics["router_aux_loss:mean"] <= experts  # at most E; k = 2 when balanced
                assert 1.0 <= step.metrics["router_load_max_over_mean:max"] <= experts / 2  # at most E / k
            else:
                assert "router_aux_loss:mean" not in step.metrics
        after = training.forward([_datum(PROMPT)], "cross_entropy").result()
        assert after.metrics["loss:sum"] < before - 0.5

        sampler = training.save_weights_and_get_sampling_client("moe-e2e").result()
        params = types.SamplingParams(max_tokens=5, temperature=0.0)
        result = sampler.sample(types.ModelInput.from_ints(PROMPT[:4]), num_samples=1, sampling_params=params).result()
        (seq,) = result.sequences
        assert len(seq.tokens) == 5 and seq.logprobs is not None
        # the sampler's logprobs are the trainer's for the same tokens
        scored = training.forward([_datum([*PROMPT[:4], *seq.tokens])], "cross_entropy").result()
        trainer_lps = scored.loss_fn_outputs[0]["logprobs"].to_numpy()[3:]
        assert seq.logprobs == pytest.approx(list(trainer_lps), abs=1e-3)
    finally:
        service.close("success").result()
        stop_server(server.process)


def test_a_model_no_path_can_serve_is_refused_at_start(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig

    model = tmp_path / "clip"
    CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        model
    )
    command = [sys.executable, "-c", "from tinkerd.cli import main; main()", "serve", "--model", str(model),
               "--data-dir", str(tmp_path / "data"), "--port", "0"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", **_env()})
    assert done.returncode != 0
    assert "clip_vision_model cannot be served" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
