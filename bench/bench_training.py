"""Training and scoring throughput: tinkerd's engine against a plain PEFT + torch.optim.AdamW fp32 loop.

Both sides run in this one process on the same batches, alternating step by step:
SmolLM2-135M-Instruct, LoRA rank 32 on every linear layer of the blocks (q, k, v, o, gate, up, down).

    .venv/bin/python bench/bench_training.py [--model-dir DIR] [--steps 5]
    .venv/bin/python bench/bench_training.py --memory   # peak RSS with 1 and 32 resident adapters
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from bench.common import default_model_dir, interleaved_medians, peak_rss_mib
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, LoraConfig
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.served_model import ForwardJob, ServedModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RAGGED = [16, 48, 96, 160, 240, 320, 400, 512]


def make_batch(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n + 1,), generator=g).tolist() for n in lengths]


def to_datums(seqs: list[list[int]]) -> list[Datum]:
    return [
        Datum(
            tokens=s[:-1],
            loss_fn_inputs={
                "target_tokens": ArrayData.of_ints(s[1:]),
                "weights": ArrayData.of_floats([1.0] * (len(s) - 1)),
            },
        )
        for s in seqs
    ]


class PeftLoop:
    """What a user would write with PEFT: pad to the longest row, mask, sum the token losses, AdamW."""

    def __init__(self, model_dir: Path) -> None:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        cfg = PeftLoraConfig(r=32, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
        self.model = get_peft_model(base, cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def _loss(self, seqs: list[list[int]]) -> torch.Tensor:
        width = max(len(s) - 1 for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            n = len(s) - 1
            ids[i, :n] = torch.tensor(s[:-1])
            labels[i, :n] = torch.tensor(s[1:])
            mask[i, :n] = 1
        logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")

    def train_step(self, seqs: list[list[int]]) -> None:
        self._loss(seqs).backward()
        self.opt.step()
        self.opt.zero_grad()

    def forward(self, seqs: list[list[int]]) -> None:
        with torch.no_grad():
            self._loss(seqs)


class EngineLoop:
    def __init__(self, model_dir: Path, train_dtype: str, adapters: int = 1) -> None:
        self.model = ServedModel.from_directory("smollm2", model_dir, EngineConfig(train_dtype=train_dtype))
        lora = LoraConfig(rank=32, seed=0, train_unembed=False)
        for i in range(adapters):
            self.model.create_adapter(f"run{i}", lora)

    def train_step(self, seqs: list[list[int]], run: str = "run0") -> None:
        self.model.forward([ForwardJob(run, to_datums(seqs), "cross_entropy", backward=True)])
        self.model.optim_step(run, AdamParams(learning_rate=1e-4))

    def forward(self, seqs: list[list[int]]) -> None:
        self.model.forward([ForwardJob("run0", to_datums(seqs), "cross_entropy")])


def throughput(model_dir: Path, steps: int) -> None:
    torch.set_num_threads(2)
    vocab = 49152
    batches = {"8 x 128": make_batch([128] * 8, vocab), "ragged 16-512": make_batch(RAGGED, vocab, seed=1)}
    peft = PeftLoop(model_dir)
    ours = EngineLoop(model_dir, "auto")  # the default: bf16 where the CPU has native bf16 matmuls, else fp32
    default = str(ours.model.config.train_torch_dtype).removeprefix("torch.")
    # On a CPU without native bf16 the default is fp32 itself: no second fp32 engine to time.
    ours32 = EngineLoop(model_dir, "float32") if default != "float32" else ours
    rows = []
    for label, seqs in batches.items():
        tokens = sum(len(s) - 1 for s in seqs)
        train = interleaved_medians(
            {
                "peft": lambda s=seqs: peft.train_step(s),
                "ours": lambda s=seqs: ours.train_step(s),
                **({"ours32": lambda s=seqs: ours32.train_step(s)} if ours32 is not ours else {}),
            },
            repeats=steps,
        )
        fwd = interleaved_medians(
            {
                "peft": lambda s=seqs: peft.forward(s),
                "ours": lambda s=seqs: ours.forward(s),
                **({"ours32": lambda s=seqs: ours32.forward(s)} if ours32 is not ours else {}),
            },
            repeats=steps,
        )
        train.setdefault("ours32", train["ours"])
        fwd.setdefault("ours32", fwd["ours"])
        rows.append((label, tokens, train, fwd))
    print(
        f"| batch | tokens | phase | PEFT fp32 tok/s | tinkerd fp32 tok/s | tinkerd default ({default}) tok/s "
        "| ratio default/PEFT |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, tokens, train, fwd in rows:
        for phase, t in (("train (fwd+bwd+AdamW)", train), ("forward (logprobs)", fwd)):
            print(
                f"| {label} | {tokens} | {phase} | {tokens / t['peft']:.0f} | {tokens / t['ours32']:.0f} | "
                f"{tokens / t['ours']:.0f} | {t['peft'] / t['ours']:.2f}x |"
            )


def memory_probe(model_dir: Path, adapters: int) -> dict[str, float]:
    """Run in a fresh process: load, train one step on every adapter, report peak RSS."""
    torch.set_num_threads(2)
    loop = EngineLoop(model_dir, "auto", adapters=adapters)
    after_load = peak_rss_mib()
    seqs = make_batch([128] * 2, 49152)
    for i in range(adapters):
        loop.train_step(seqs, run=f"run{i}")
    params = loop.model.adapters["run0"].num_parameters()
    return {"adapters": adapters, "peak_rss_mib": peak_rss_mib(), "after_load_mib": after_load, "params": params}


def memory(model_dir: Path) -> None:
    results = []
    for n in (1, 32):
        out = subprocess.run(
            [sys.executable, "-m", "bench.bench_training", "--model-dir", str(model_dir), "--memory-probe", str(n)],
            check=True,
            capture_output=True,
            text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    per_adapter_mib = results[0]["params"] * 4 * 3 / 2**20  # fp32 weights + two Adam moments (+ grads freed)
    extra = results[1]["peak_rss_mib"] - results[0]["peak_rss_mib"]
    print("| resident adapters | peak RSS MiB |")
    print("|---|---|")
    for r in results:
        print(f"| {r['adapters']} | {r['peak_rss_mib']:.0f} |")
    print(
        f"\n31 more adapters cost {extra:.0f} MiB; 31 x (adapter + Adam state) = {31 * per_adapter_mib:.0f} MiB "
        f"({results[0]['params']:,} parameters each)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.model_dir, args.memory_probe)))
    elif args.memory:
        memory(args.model_dir)
    else:
        throughput(args.model_dir, args.steps)


if __name__ == "__main__":
    main()
