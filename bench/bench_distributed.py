"""One trainer on 1 rank x 2 threads against 2 ranks x 1 thread (torch.distributed, gloo on this CPU), with the
frozen base replicated on every rank or sharded across them (FSDP2): step time, tokens/s and peak memory per rank,
side by side in one run.

Each configuration runs in a process of its own (torch's thread count is per process), alternating round by round
on the same batches: LoRA rank 32 on every linear layer (attention, MLP, unembedding), cross_entropy,
forward_backward + optim_step, SmolLM2-135M-Instruct by default, in the default training dtype (--dtype to change).
Peak memory per rank is each rank's peak resident set during the steps (reset once the base is loaded, and sharded
where it is: loading reads the whole base on every rank first). Rank 0 here is a trainer only, as in `tinkerd
trainer`: in `tinkerd serve` it also keeps a whole copy of the base for sampling.

    .venv/bin/python -m bench.bench_distributed                       # 8x128 and 64x128, 5 steps, 2 rounds
    .venv/bin/python -m bench.bench_distributed --tiny --shapes 2x16 --steps 2 --rounds 1   # proves it in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import default_model_dir
from tinkerd.domain.ops import AdamParams, ArrayData, Datum, LoraConfig
from tinkerd.engine.model_paths import load_hf_model
from tinkerd.engine.served_model import ForwardJob, ServedModel
from tinkerd.settings import Settings

# (ranks, threads per rank, base)
CONFIGS = ((1, 2, "replicated"), (2, 1, "replicated"), (2, 1, "sharded"))
ADAM = AdamParams(learning_rate=1e-4)


def make_datums(batch: int, seq: int, vocab: int, seed: int) -> list[Datum]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        tokens = torch.randint(3, vocab, (seq + 1,), generator=g).tolist()
        inputs = {"target_tokens": ArrayData.of_ints(tokens[1:]), "weights": ArrayData.of_floats([1.0] * seq)}
        out.append(Datum(tokens[:-1], inputs))
    return out


def _vm_mib(pid: int | str, field: str = "VmHWM:") -> float:
    """A process's peak (VmHWM) or current (VmRSS) resident memory (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(pid: int | str) -> None:
    """Start a process's peak resident memory afresh from its current size (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: median step seconds and peak memory of every rank."""
    from tinkerd.roles.ranks import engine_config, handshake, release_freed_memory, start_ranks

    model_dir = Path(spec["model_dir"])
    settings = Settings.load(
        models=[str(model_dir)], cache_dir=Path(spec["cache_dir"]), ranks=spec["ranks"], threads=spec["threads"],
        rank_timeout_s=1800, base_sharding=spec["base"], dtype=spec["dtype"],
    )  # fmt: skip
    ranks = start_ranks(settings)
    try:
        engine = engine_config(settings, ranks.device if ranks is not None else "cpu")
        hf = load_hf_model(model_dir, engine.torch_device)
        model = ranks.make_served(str(model_dir), hf, engine) if ranks else ServedModel(str(model_dir), hf, engine)
        del hf
        if ranks is not None:
            handshake(ranks.channel, {str(model_dir): model})
        release_freed_memory()  # what loading (and, sharded, the whole base) freed: the peak counts live memory
        pids: list[int | str] = ["self", *(child.pid for child in (ranks.children if ranks is not None else []))]
        held = [_vm_mib(pid, "VmRSS:") for pid in pids]
        for pid in pids:
            _reset_peak(pid)
        model.create_adapter("bench", LoraConfig(rank=32, seed=0))
        datums = make_datums(spec["batch"], spec["seq"], model.vocab_size, seed=1)
        job = ForwardJob("bench", datums, "cross_entropy", backward=True)
        times = []
        for step in range(spec["steps"] + 1):  # the first step warms up
            started = time.perf_counter()
            model.forward([job])
            model.optim_step("bench", ADAM)
            if step:
                times.append(time.perf_counter() - started)
        followers = [_vm_mib(child.pid) for child in ranks.children] if ranks is not None else []
        return {
            "step_s": statistics.median(times),
            "rank0_mib": _vm_mib("self"),
            "followers_mib": followers,
            "held_mib": held,
        }
    finally:
        if ranks is not None:
            ranks.close()


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.bench_distributed", "--worker", json.dumps(spec)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_model_dir(root: Path) -> Path:
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    out = root / "tiny-llama"
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (a smoke test)")
    parser.add_argument("--shapes", default="8x128,64x128", help="batch x tokens per datum, comma-separated")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="each configuration runs this many times, alternating")
    parser.add_argument("--dtype", default=None, help="training dtype of the base (default: tinkerd's, auto)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
        model_dir = tiny_model_dir(Path(scratch)) if args.tiny else (args.model_dir or default_model_dir())
        print(f"model {model_dir}; LoRA rank 32 on every linear layer; forward_backward + optim_step; gloo on CPU")
        print(f"median of {args.steps} steps per run, {args.rounds} alternating rounds; dtype {args.dtype or 'auto'}")
        print()
        header = (
            f"{'shape':>8} {'ranks x threads':>16} {'base':>11} {'step s':>8} {'tokens/s':>9} {'vs 1x2':>7} "
            f"{'held MiB/rank':>14} {'peak MiB/rank':>16}"
        )
        print(header)
        for shape in args.shapes.split(","):
            batch, seq = (int(x) for x in shape.lower().split("x"))
            results: dict[tuple[int, int, str], list[dict[str, Any]]] = {c: [] for c in CONFIGS}
            for _ in range(args.rounds):
                for ranks, threads, base in CONFIGS:
                    spec = dict(model_dir=str(model_dir), cache_dir=scratch, ranks=ranks, threads=threads, base=base)
                    spec.update(batch=batch, seq=seq, steps=args.steps, dtype=args.dtype)
                    results[(ranks, threads, base)].append(run_config(spec))
            baseline = statistics.median(r["step_s"] for r in results[CONFIGS[0]])
            for (ranks, threads, base), runs in results.items():
                step_s = statistics.median(r["step_s"] for r in runs)
                memory = [max(r["rank0_mib"] for r in runs)]
                memory += [max(r["followers_mib"][i] for r in runs) for i in range(ranks - 1)]
                mib = " / ".join(f"{m:.0f}" for m in memory)
                held = " / ".join(f"{m:.0f}" for m in runs[0]["held_mib"])
                print(
                    f"{shape:>8} {f'{ranks} x {threads}':>16} {base:>11} {step_s:>8.3f} {batch * seq / step_s:>9.0f} "
                    f"{baseline / step_s:>6.2f}x {held:>14} {mib:>16}"
                )
        print()
        print("held MiB/rank: resident set once loaded (and sharded), before the first step; rank 0 / rank 1")
        print("peak MiB/rank: peak resident set during the steps (counted from the held figure); rank 0 trains only")


if __name__ == "__main__":
    main()
