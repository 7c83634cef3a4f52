"""Does SFT through the SDK teach SmolLM2-135M-Instruct a rule? Held-out exact match on pig latin, before and after.

The data and the SDK calls are `examples/pig_latin.py`'s: English words turned into pig latin by a fixed rule, a
LoRA adapter trained with cross-entropy on the answers of the training words, greedy samples (temperature 0) on words
held out of training scored by exact match against the rule. Every `--eval-every` steps the adapter's weights are
snapshotted and both the held-out words and as many training words are sampled, so the curve shows generalisation
beside memorisation. The learning rate decays linearly to `--final-lr-fraction` of `--lr`.

`--format spelled` (the default) writes prompt and answer one letter per token (``s t r i n g`` -> ``i n g - s t r a
y``); `--format words` is the example's own format (``string`` -> ``ing-stray``), which needs the model to spell
tokens it reads whole, and a 135M model cannot do that for words it has not trained on (see bench/RESULTS.md).

Starts tinkerd in this process (`tinkerd.running()`, the default model) unless `--base-url` names a running server.
Prints the loss per step and the exact match at each evaluation, writes the curve as JSON and a PNG plot.

    .venv/bin/python -m bench.bench_sft_piglatin [--format spelled|words] [--steps 60] [--lr 2e-3] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tinker
from tinker import types

from bench.common import DEFAULT_MODEL, default_model_dir
from examples.pig_latin import (
    Example,
    batches,
    exact_match,
    example,
    greedy_answers,
    load_words,
    make_datum,
    pig_latin,
    split_words,
    train_step,
)

OUT_DIR = Path(__file__).parent / "out"


def spelled_example(word: str) -> Example:
    """The same task with every letter a token of its own: ``English: h e l l o`` -> ``e l l o - h a y``."""
    return Example(f"English: {' '.join(word)}\nPig Latin:", " ".join(pig_latin(word)))


FORMATS = {"words": example, "spelled": spelled_example}


@dataclass
class Evaluation:
    step: int
    held_out: float  # exact match on the held-out words
    train: float  # exact match on as many training words
    seconds: float


@dataclass
class Curve:
    settings: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    evaluations: list[Evaluation] = field(default_factory=list)
    final_answers: dict[str, str] = field(default_factory=dict)


def evaluate(
    sampler: tinker.SamplingClient, tokenizer: Any, step: int, held_out: list[Example], train_probe: list[Example]
) -> tuple[Evaluation, list[str]]:
    """The exact match on both lists, and the answers for the held-out words."""
    start = time.perf_counter()
    answers = greedy_answers(sampler, tokenizer, held_out + train_probe)
    held, seen = answers[: len(held_out)], answers[len(held_out) :]
    seconds = time.perf_counter() - start
    return Evaluation(step, exact_match(held_out, held), exact_match(train_probe, seen), seconds), held


def learning_rate(args: argparse.Namespace, step: int) -> float:
    """Linear decay from lr to lr * final_lr_fraction over the run."""
    progress = step / max(1, args.steps - 1)
    return args.lr * (1.0 - (1.0 - args.final_lr_fraction) * progress)


def run(base_url: str, args: argparse.Namespace, curve: Curve) -> list[str]:
    """Trains and evaluates into `curve`; returns the held-out words."""
    train_words, held_out_words = split_words(load_words(), args.held_out, args.seed)
    to_example = FORMATS[args.format]
    held_out = [to_example(w) for w in held_out_words]
    train_probe = [to_example(w) for w in train_words[: len(held_out)]]
    service = tinker.ServiceClient(base_url=base_url, api_key=os.environ.get("TINKER_API_KEY", "tml-bench"))
    training = service.create_lora_training_client(base_model=args.model, rank=args.rank, seed=args.seed).result()
    tokenizer = training.get_tokenizer()
    print(f"{len(train_words)} training words, {len(held_out)} held out; rank {args.rank}, batch {args.batch_size}")

    def checkpoint(step: int) -> None:
        sampler = training.save_weights_and_get_sampling_client().result()
        evaluation, answers = evaluate(sampler, tokenizer, step, held_out, train_probe)
        curve.evaluations.append(evaluation)
        curve.final_answers = dict(zip(held_out_words, answers, strict=True))
        print(
            f"eval @ step {step:4d}: exact match held-out {evaluation.held_out:6.1%}  "
            f"train {evaluation.train:6.1%}  ({evaluation.seconds:.1f} s)",
            flush=True,
        )

    checkpoint(0)
    train_seconds = 0.0
    words_iter = batches(train_words, args.batch_size, args.seed)
    for step in range(args.steps):
        batch = [make_datum(tokenizer, to_example(w)) for w in next(words_iter)]
        lr = learning_rate(args, step)
        start = time.perf_counter()
        curve.losses.append(train_step(training, batch, types.AdamParams(learning_rate=lr)))
        train_seconds += time.perf_counter() - start
        if (step + 1) % args.log_every == 0:
            recent = curve.losses[-args.log_every :]
            print(
                f"step {step + 1:4d}  loss per answer token {sum(recent) / len(recent):.3f}  lr {lr:.2e}  "
                f"{train_seconds / (step + 1):.2f} s/step",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            checkpoint(step + 1)
    return held_out_words


def plot(curve: Curve, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(range(1, len(curve.losses) + 1), curve.losses, lw=0.8, color="tab:blue", alpha=0.5, label="per step")
    window = 10
    if len(curve.losses) >= window:
        smooth = [sum(curve.losses[i - window : i]) / window for i in range(window, len(curve.losses) + 1)]
        left.plot(range(window, len(curve.losses) + 1), smooth, color="tab:blue", label=f"mean of {window}")
    left.set(xlabel="step", ylabel="cross-entropy per answer token", title="training loss", yscale="log")
    left.legend()
    steps = [e.step for e in curve.evaluations]
    right.plot(steps, [100 * e.held_out for e in curve.evaluations], "o-", label="held-out words")
    right.plot(steps, [100 * e.train for e in curve.evaluations], "s--", label="training words", alpha=0.7)
    right.axhline(50, color="grey", lw=0.8, ls=":")
    right.set(xlabel="step", ylabel="exact match, greedy (%)", title="pig latin exact match", ylim=(0, 100))
    right.legend()
    s = curve.settings
    fig.suptitle(
        f"SFT of {s['model'].split('/')[-1]} through the tinker SDK on tinkerd ({s['format']} format): "
        f"LoRA rank {s['rank']}, batch {s['batch_size']}, lr {s['lr']:g}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=None, help="a running server; default: tinkerd in this process")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--format", choices=sorted(FORMATS), default="spelled", help="letters apart, or whole words")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--final-lr-fraction", type=float, default=0.1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--name", default="sft_piglatin", help="output names: bench/out/NAME.json, bench/NAME.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # The SDK warns each time a result takes longer than one long-poll (25 s on tinkerd) to come back, which a queue
    # of 200 evaluation prompts on a shared CPU does; the waits show in the eval timings instead.
    logging.getLogger("tinker.lib.api_future_impl").setLevel(logging.ERROR)
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The SDK loads the tokenizer by repo id; tinkerd keeps an offline hub cache of the default model here.
    os.environ.setdefault("HF_HOME", str(default_model_dir().parents[2] / "hf"))
    curve = Curve(settings={k: v for k, v in vars(args).items() if k != "base_url"})
    server: AbstractContextManager[str]
    if args.base_url:
        server = nullcontext(args.base_url)
    else:
        import tinkerd

        server = tinkerd.running()
    started = time.perf_counter()
    with server as base_url:
        held_out = run(base_url, args, curve)
    minutes = (time.perf_counter() - started) / 60

    OUT_DIR.mkdir(exist_ok=True)
    data_path = OUT_DIR / f"{args.name}.json"
    data_path.write_text(json.dumps({**asdict(curve), "minutes": minutes}, indent=1))
    png = Path(__file__).parent / f"{args.name}.png"
    plot(curve, png)

    first, last = curve.evaluations[0], curve.evaluations[-1]
    print(f"\nheld-out exact match: {first.held_out:.1%} before -> {last.held_out:.1%} after {args.steps} steps")
    print(f"training-word exact match: {first.train:.1%} -> {last.train:.1%}")
    print(f"wall time {minutes:.1f} min; curve in {data_path}, plot in {png}")
    want = {w: FORMATS[args.format](w).answer for w in held_out}
    wrong = [(w, a) for w, a in curve.final_answers.items() if a != want[w]]
    print(f"held-out misses ({len(wrong)}/{len(held_out)}): " + ", ".join(f"{w}->{a}" for w, a in wrong[:15]))


if __name__ == "__main__":
    main()
