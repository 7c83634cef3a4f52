"""Train a small LoRA on the capitals training split through the tinker SDK and print its sampler checkpoint, for
the lm-eval-harness run in the README ("OpenAI-compatible API"). Needs a running `tinkerd serve` (TINKER_BASE_URL)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import tinker
from tinker import types
from transformers import AutoTokenizer

HERE = Path(__file__).parent
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def datum(tokenizer: object, prompt: str, answer: str) -> types.Datum:
    encode = tokenizer.encode  # type: ignore[attr-defined]
    prompt_tokens = encode(prompt, add_special_tokens=False)
    answer_tokens = encode(" " + answer + "\n", add_special_tokens=False)
    tokens = prompt_tokens + answer_tokens
    weights = [0.0] * (len(prompt_tokens) - 1) + [1.0] * len(answer_tokens)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(tokens) - 1]),
        },
    )


def main() -> None:
    service = tinker.ServiceClient(base_url=os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000"))
    training = service.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    # The tokenizer of the pulled model (the SDK's get_tokenizer() would ask the Hugging Face hub for it).
    cache = Path(os.environ.get("TINKERD_CACHE_DIR", Path.home() / ".cache" / "tinkerd"))
    tokenizer = AutoTokenizer.from_pretrained(cache / "models" / MODEL)
    rows = [json.loads(line) for line in (HERE / "capitals_train.jsonl").read_text().splitlines()]
    batch = [datum(tokenizer, f"Q: What is the capital of {r['country']}?\nA:", r["answer"]) for r in rows]
    for step in range(int(os.environ.get("CAPITALS_STEPS", "12"))):
        out = training.forward_backward(batch, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        print(f"step {step}: loss per example {out.metrics['loss:sum'] / len(batch):.3f}", flush=True)
    print(training.save_weights_for_sampler("capitals").result().path)
    service.close("success").result()


if __name__ == "__main__":
    main()
