"""Training through the official SDK against `tinkerd serve`, side by side with a PEFT fp32 loop and the engine.

One run, three contestants on the same batches, alternating call by call so that machine noise hits all alike:
the SDK (forward_backward + optim_step through HTTP to a `tinkerd serve` subprocess in its default configuration),
tinkerd's engine in this process (what bench/bench_training.py measures), and a plain PEFT + torch.optim.AdamW fp32
loop. SmolLM2-135M-Instruct, LoRA rank 32 on q, k, v, o, gate, up, down (no unembedding, like the PEFT loop).

    .venv/bin/python -m bench.bench_training_sdk [--model-dir DIR] [--steps 5]
    .venv/bin/python -m bench.bench_training_sdk --learning   # mean target logprob moved after steps 1-3, via SDK

The server and this process share the machine's cores; while one side computes the others wait.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import tinker
import torch

from bench.bench_training import RAGGED, EngineLoop, PeftLoop, make_batch
from bench.common import DEFAULT_MODEL, default_model_dir, interleaved_medians, serving


def sdk_datums(seqs: list[list[int]]) -> list[tinker.Datum]:
    return [
        tinker.Datum(
            model_input=tinker.ModelInput.from_ints(s[:-1]),
            loss_fn_inputs={
                "target_tokens": tinker.TensorData(data=s[1:], dtype="int64", shape=[len(s) - 1]),
                "weights": tinker.TensorData(data=[1.0] * (len(s) - 1), dtype="float32", shape=[len(s) - 1]),
            },
        )
        for s in seqs
    ]


def served_model(service: tinker.ServiceClient) -> str:
    """The one base model the bench's server serves (named by its directory)."""
    return service.get_server_capabilities().supported_models[0].model_name or DEFAULT_MODEL


def sdk_trainer(url: str) -> tinker.TrainingClient:
    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    base = served_model(service)
    return service.create_lora_training_client(base_model=base, rank=32, seed=0, train_unembed=False)


def sdk_step(trainer: tinker.TrainingClient, datums: list[tinker.Datum]) -> Callable[[], object]:
    def step() -> None:
        fb = trainer.forward_backward(datums, "cross_entropy")
        opt = trainer.optim_step(tinker.AdamParams(learning_rate=1e-4))
        fb.result()
        opt.result()

    return step


def throughput(model_dir: Path, steps: int, serve_args: list[str]) -> None:
    torch.set_num_threads(2)
    batches = {"8 x 128": make_batch([128] * 8, 49152), "ragged 16-512": make_batch(RAGGED, 49152, seed=1)}
    peft = PeftLoop(model_dir)
    engine = EngineLoop(model_dir, "auto")  # the engine in its default configuration, as `tinkerd serve` runs it
    rows = []
    with tempfile.TemporaryDirectory() as tmp, serving(model_dir, Path(tmp), *serve_args) as (url, _):
        trainer = sdk_trainer(url)
        for label, seqs in batches.items():
            tokens = sum(len(s) - 1 for s in seqs)
            datums = sdk_datums(seqs)
            t = interleaved_medians(
                {
                    "peft": lambda s=seqs: peft.train_step(s),
                    "engine": lambda s=seqs: engine.train_step(s),
                    "sdk": sdk_step(trainer, datums),
                },
                repeats=steps,
            )
            rows.append((label, tokens, t))
    print(
        "| batch | tokens | PEFT fp32 tok/s | engine in-process tok/s | SDK -> tinkerd serve tok/s "
        "| SDK/PEFT | SDK/engine |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, tokens, t in rows:
        print(
            f"| {label} | {tokens} | {tokens / t['peft']:.0f} | {tokens / t['engine']:.0f} | {tokens / t['sdk']:.0f} "
            f"| {t['peft'] / t['sdk']:.2f}x | {t['engine'] / t['sdk']:.2f}x |"
        )


def learning(model_dir: Path, steps: int) -> None:
    """Mean target logprob moved after each step, default configuration vs `--dtype float32`, through the SDK."""
    seqs = make_batch([128] * 8, 49152)
    datums = sdk_datums(seqs)
    curves: dict[str, list[float]] = {}
    for label, args in (("default (bf16)", []), ("--dtype float32", ["--dtype", "float32"])):
        with tempfile.TemporaryDirectory() as tmp, serving(model_dir, Path(tmp), *args) as (url, _):
            service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
            trainer = service.create_lora_training_client(base_model=served_model(service), rank=32, seed=0)

            def mean_logprob(t: tinker.TrainingClient = trainer) -> float:
                out = t.forward(datums, "cross_entropy").result().loss_fn_outputs
                values = [v for o in out for v in o["logprobs"].tolist()]
                return sum(values) / len(values)

            start = mean_logprob()
            moved = []
            for _ in range(steps):
                sdk_step(trainer, datums)()
                moved.append(mean_logprob() - start)
            curves[label] = moved
    ref = curves["--dtype float32"]
    print("| tinkerd serve | " + " | ".join(f"after step {i}" for i in range(1, steps + 1)) + " |")
    print("|---|" + "---|" * steps)
    for label, moved in curves.items():
        cells = [f"{m:+.4f} ({m / r:.2f}x fp32)" for m, r in zip(moved, ref, strict=True)]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--learning", action="store_true")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `tinkerd serve` argument")
    args = parser.parse_args()
    if args.learning:
        learning(args.model_dir, 3)
    else:
        throughput(args.model_dir, args.steps, args.serve_arg)


if __name__ == "__main__":
    main()
