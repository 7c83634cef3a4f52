"""Learning, not only running: tinker-cookbook's RL loop on arithmetic against `tinkerd serve`, on the real SmolLM2.

Starts `tinkerd serve` (the default SmolLM2-135M-Instruct, real weights) as a subprocess on 127.0.0.1 and runs the
cookbook's own RL trainer (`tinker_cookbook.rl.train.main`, the loop behind `recipes.math_rl`) in this process with
the recipe's arithmetic environment (`recipes.math_rl.arithmetic_env.ArithmeticEnv`: reward 1 for the right sum,
minus 0.1 for an answer that does not end with the stop token), its few-shot prefix and the recipe's default loss
(`stable_reinforce`). Prints the mean reward and accuracy per step, writes the run (metrics.jsonl,
checkpoints.jsonl) under --out and plots the curves to --plot.

`--env recipe` draws the operands as the recipe does (0..100); `--env small` (the default) draws them from
0..--max-operand, because the 135M model gets essentially none of the recipe's two-digit sums right, so there is
no reward to learn from (see bench/RESULTS.md).

    .venv/bin/python -m bench.bench_rl_arithmetic [--steps 20] [--group-size 8] [--groups-per-batch 8] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_MODEL
from tests.e2e.conftest import start_server, stop_server
from tinkerd import hub
from tinkerd.settings import Settings

RENDERER = "qwen3_instruct"  # ChatML without <think>: SmolLM2's chat format (docs/tinker-cookbook-offline.md)


def _client_env(url: str) -> None:
    """What a user sets before running a recipe against tinkerd (README, "Running tinker-cookbook recipes")."""
    cache_dir = Settings.load().cache_dir
    os.environ.update(
        TINKER_BASE_URL=url,
        TINKER_API_KEY="tml-bench",
        TINKER_TELEMETRY="0",
        HF_HOME=str(hub.hf_home(cache_dir)),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )


def _dataset_builder(args: argparse.Namespace) -> object:
    """The recipe's arithmetic dataset (`--env recipe`) or the same environment with small operands."""
    import chz
    from tinker_cookbook import renderers
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder, ArithmeticEnv
    from tinker_cookbook.rl.problem_env import ProblemGroupBuilder
    from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    if args.env == "recipe":
        return ArithmeticDatasetBuilder(
            batch_size=args.groups_per_batch,
            model_name_for_tokenizer=DEFAULT_MODEL,
            renderer_name=RENDERER,
            n_batches=args.steps,
            group_size=args.group_size,
        )

    class SmallSums(RLDataset):
        def __init__(self, renderer: renderers.Renderer) -> None:
            self.renderer = renderer

        def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
            rng = np.random.RandomState(args.seed * 100_003 + index)
            builders: list[EnvGroupBuilder] = []
            for _ in range(args.groups_per_batch):
                x, y = (int(v) for v in rng.randint(0, args.max_operand + 1, size=2))
                env = partial(
                    ArithmeticEnv, x, y, convo_prefix=ArithmeticEnv.standard_fewshot_prefix(), renderer=self.renderer
                )
                builders.append(ProblemGroupBuilder(env_thunk=env, num_envs=args.group_size))
            return builders

        def __len__(self) -> int:
            return args.steps

    @chz.chz
    class SmallSumsBuilder(RLDatasetBuilder):
        async def __call__(self) -> tuple[RLDataset, None]:
            tokenizer = get_tokenizer(DEFAULT_MODEL)
            return SmallSums(renderers.get_renderer(RENDERER, tokenizer=tokenizer)), None

    return SmallSumsBuilder()


def train(args: argparse.Namespace, log_path: Path) -> None:
    from tinker_cookbook.rl import train as rl_train

    config = rl_train.Config(
        learning_rate=args.lr,
        dataset_builder=_dataset_builder(args),  # type: ignore[arg-type]  # an RLDatasetBuilder, built lazily
        model_name=DEFAULT_MODEL,
        renderer_name=RENDERER,
        lora_rank=args.rank,
        max_tokens=args.max_tokens,
        log_path=str(log_path),
        loss_fn=args.loss_fn,
        eval_every=0,
        save_every=args.steps,
        max_steps=args.steps,
        num_groups_to_log=0,
        recipe_name="bench_rl_arithmetic",
    )
    asyncio.run(rl_train.main(config))


def read_curve(log_path: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if "env/all/reward/total" in row]


def plot(curve: list[dict[str, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(row["step"]) for row in curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(steps, [row["env/all/reward/total"] for row in curve], marker="o", label="mean reward")
    ax.plot(steps, [row["env/all/correct"] for row in curve], marker="s", linestyle="--", label="fraction correct")
    ax.set_xlabel("training step")
    ax.set_ylim(-0.15, 1.05)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description="tinker-cookbook RL on arithmetic against tinkerd serve")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--groups-per-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=5)
    parser.add_argument("--loss-fn", default="stable_reinforce")
    parser.add_argument("--env", choices=("small", "recipe"), default="small")
    parser.add_argument("--max-operand", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/out/rl_arithmetic"))
    parser.add_argument("--plot", type=Path, default=Path("bench/rl_arithmetic.png"))
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    # The model by its hub name, from the user's cache (pulled by `tinkerd models pull`), as `make serve` runs it.
    cache_dir = Settings.load().cache_dir
    server = start_server(args.out, DEFAULT_MODEL, cache_dir=cache_dir)
    start = time.monotonic()
    try:
        _client_env(server.url)
        train(args, args.out / "run")
    finally:
        stop_server(server.process)
    elapsed = time.monotonic() - start

    curve = read_curve(args.out / "run")
    print(f"{'step':>4} {'reward':>8} {'correct':>8} {'format':>7} {'seconds':>8}")
    for row in curve:
        seconds = row.get("time/total", math.nan)
        print(
            f"{int(row['step']):>4} {row['env/all/reward/total']:>8.3f} {row['env/all/correct']:>8.3f} "
            f"{row['env/all/format']:>7.3f} {seconds:>8.1f}"
        )
    first, last = curve[: max(1, len(curve) // 4)], curve[-max(1, len(curve) // 4) :]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(
        f"mean reward, first {len(first)} steps: {mean(first, 'env/all/reward/total'):.3f}; "
        f"last {len(last)} steps: {mean(last, 'env/all/reward/total'):.3f}  "
        f"(accuracy {mean(first, 'env/all/correct'):.3f} -> {mean(last, 'env/all/correct'):.3f}); "
        f"{len(curve)} steps in {elapsed / 60:.1f} min"
    )
    operands = "0..100 (the recipe's)" if args.env == "recipe" else f"0..{args.max_operand}"
    title = (
        f"tinker-cookbook RL on SmolLM2-135M-Instruct via tinkerd: x + y, operands {operands}\n"
        f"loss {args.loss_fn}, {args.groups_per_batch} groups x {args.group_size} samples, lr {args.lr}, "
        f"LoRA rank {args.rank}"
    )
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(curve, args.plot, title)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
