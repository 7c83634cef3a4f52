"""How far the same optimizer steps move the model: tinkerd (bf16 base matmuls, and fp32) against a PEFT fp32 loop.

Every side starts from the same adapter (A from tinkerd's seeded init, B = 0), trains the same batch with Adam at
lr 1e-4 for a few steps, and after each step scores the batch again; the figure is the change of the mean target
logprob since step 0. An engine that rounds small LoRA updates away moves less than the fp32 reference.

    .venv/bin/python -m bench.bench_learning [--model-dir DIR] [--steps 3] [--rows 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from bench.bench_training import make_batch, to_datums
from bench.common import default_model_dir
from tinkerd.domain.ops import AdamParams, LoraConfig
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.served_model import ForwardJob, ServedModel

LR = 1e-4
RANK = 32


def engine_curve(model_dir: Path, dtype: str, seqs: list[list[int]], steps: int) -> tuple[list[float], LoraWeights]:
    model = ServedModel.from_directory("m", model_dir, EngineConfig(train_dtype=dtype))
    model.create_adapter("run", LoraConfig(rank=RANK, seed=0))
    initial = model.snapshot("run")
    datums = to_datums(seqs)

    def mean_logprob() -> float:
        out = model.forward([ForwardJob("run", datums, "cross_entropy")])[0]
        values = [v for o in out.loss_fn_outputs for v in o["logprobs"].values]
        return sum(values) / len(values)

    curve = [mean_logprob()]
    for _ in range(steps):
        model.forward([ForwardJob("run", datums, "cross_entropy", backward=True)])
        model.optim_step("run", AdamParams(learning_rate=LR))
        curve.append(mean_logprob())
    return curve, initial


def peft_curve(model_dir: Path, initial: LoraWeights, seqs: list[list[int]], steps: int) -> list[float]:
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    targets = sorted({name.rsplit(".", 1)[-1] for name in initial.a})
    model = get_peft_model(base, PeftLoraConfig(r=RANK, lora_alpha=int(initial.alpha), target_modules=targets))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in initial.a.items():
            params[f"base_model.model.{name}.lora_A.default.weight"].copy_(a)
            params[f"base_model.model.{name}.lora_B.default.weight"].copy_(initial.b[name])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    ids = torch.tensor([s[:-1] for s in seqs])
    labels = torch.tensor([s[1:] for s in seqs])

    def total_logprob() -> torch.Tensor:
        logits = model(input_ids=ids).logits.float()
        return torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum()

    n = labels.numel()
    with torch.no_grad():
        curve = [total_logprob().item() / n]
    for _ in range(steps):
        (-total_logprob()).backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            curve.append(total_logprob().item() / n)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--rows", type=int, default=8, help="rows of 128 tokens (bf16 on a CPU without it is slow)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seqs = make_batch([128] * args.rows, 49152)
    curves: dict[str, list[float]] = {}
    curves["tinkerd bf16"], initial = engine_curve(args.model_dir, "bfloat16", seqs, args.steps)
    curves["tinkerd fp32"], _ = engine_curve(args.model_dir, "float32", seqs, args.steps)
    if not args.no_peft:
        curves["PEFT fp32"] = peft_curve(args.model_dir, initial, seqs, args.steps)
    ref = curves["tinkerd fp32"]
    print("| engine | " + " | ".join(f"step {i}" for i in range(1, args.steps + 1)) + " |")
    print("|---|" + "---|" * args.steps)
    for name, curve in curves.items():
        cells = []
        for i in range(1, args.steps + 1):
            moved, ref_moved = curve[i] - curve[0], ref[i] - ref[0]
            cells.append(f"{moved:+.4f} ({moved / ref_moved:.2f}x fp32)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
