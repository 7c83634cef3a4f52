"""Sampling throughput: tinkerd's continuous-batching sampler against transformers' ``generate``, side by side.

Same model, same prompts, same distribution (temperature 1 and generate's default top-k of 50, on both sides), every
sequence 64 new tokens (end of sequence ignored); throughput counts the whole request, prefill included. Also batch-1
decode time per token against the memory-bandwidth bound (weight bytes / copy bandwidth measured here), and
optionally bf16 and the other weight layouts (column-major, and nn.Linear's row-major as loaded). Prints markdown
tables.

    .venv/bin/python bench/bench_sampling.py --model-dir ~/.cache/tinkerd/models/HuggingFaceTB/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tinkerd.domain.ops import SamplingParams
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.decode_layout import use_decode_layout
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.transformer import Transformer
from tinkerd.worker.hosts import ModelHost

DEFAULT_MODEL_DIR = Path.home() / ".cache/tinkerd/models/HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "Give three tips for learning to code.",
    "What does a compiler do?",
    "Describe a cat in one sentence.",
    "How do airplanes stay in the air?",
]


def prompts(model_dir: Path, count: int) -> list[list[int]]:
    """``count`` distinct chat prompts cut to one common length, so ``generate`` needs no padding."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    out: list[list[int]] = []
    for i in range(count):
        messages = [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (variant {i})"}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append(list(ids))  # type: ignore[arg-type]
    length = min(len(p) for p in out)
    return [p[-length:] for p in out]


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best (least) seconds of ``repeats`` runs of each, after a warm-up; runs interleave so that all contenders see
    the same machine (it is shared: the minimum is the figure least disturbed by other work)."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def ours(sampler: Sampler, batch: list[list[int]], new_tokens: int, top_k: int) -> None:
    params = [SamplingParams(max_tokens=new_tokens, temperature=1.0, top_k=top_k, seed=i) for i in range(len(batch))]
    sampler.run([SampleJob(p, sp, 1, None) for p, sp in zip(batch, params, strict=True)])


def hf_generate(model: torch.nn.Module, batch: list[list[int]], new_tokens: int, top_k: int) -> None:
    input_ids = torch.tensor(batch)
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=True,
            temperature=1.0,
            top_k=max(top_k, 0),  # 0 turns generate's top-k off
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
        )
    assert out.shape[1] == input_ids.shape[1] + new_tokens


def decode_ms_per_token(sampler: Sampler, prompt: list[int], steps: int) -> float:
    """Median wall time of a batch-1 decode step (prefill excluded)."""
    sampler.submit(SampleJob(prompt, SamplingParams(max_tokens=steps + 2, temperature=1.0, seed=0), 1, None))
    sampler.step()  # prefill + first decode
    times: list[float] = []
    while sampler.has_work():
        start = time.perf_counter()
        sampler.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3  # the median step: a whole run's best step would flatter


def bandwidths(nbytes: int = 1 << 29, repeats: int = 5) -> tuple[float, float]:
    """(copy, read) bytes per second: a large tensor copy counting the bytes copied (engine-baseline.md's
    definition), and a large sum (reads only, as decoding mostly does)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = timed({"copy": lambda: dst.copy_(src), "read": lambda: src.sum()}, repeats)
    return nbytes / seconds["copy"], nbytes / seconds["read"]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every distinct weight once (tied embeddings count once, as the head reads them)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def profile(sampler: Sampler, batch: list[list[int]], steps: int, top_k: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for i, p in enumerate(batch):
        params = SamplingParams(max_tokens=steps + 8, temperature=1.0, top_k=top_k, seed=i)
        sampler.submit(SampleJob(p, params, 1, None))
    sampler.step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            sampler.step()
    while sampler.has_work():
        sampler.step()
    print(f"\nprofile of {steps} decode steps at batch {len(batch)}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=50, help="both sides; 50 is generate's default, -1 for none")
    parser.add_argument("--bf16", action="store_true", help="also run our sampler with a bf16 transformer")
    parser.add_argument(
        "--layouts",
        default="packed",
        help="comma-separated fp32 weight layouts to run: packed (oneDNN, the default), column, row (as loaded)",
    )
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument(
        "--no-served",
        action="store_true",
        help="skip the sampler as `tinkerd serve` builds it (decode, then rescoring with the training forward)",
    )
    parser.add_argument("--profile", type=int, default=0, metavar="BATCH", help="profile decode steps at this batch")
    args = parser.parse_args()
    if not (args.model_dir / "config.json").exists():
        raise SystemExit(f"no model at {args.model_dir}: run `tinkerd models pull` or pass --model-dir")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    all_prompts = prompts(args.model_dir, max(batches))
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    hf.eval()
    hf.generation_config.eos_token_id = None  # every sequence runs the full length

    def engine(dtype: torch.dtype, layout: str) -> Sampler:
        transformer = Transformer(copy.deepcopy(hf), dtype)
        if layout != "row":
            use_decode_layout(transformer, pack=layout == "packed")
        return Sampler(transformer, max_batch=max(batches))

    layouts = args.layouts.split(",")
    engines = {"tinkerd fp32" + ("" if lay == layouts[0] else f" {lay}"): engine(torch.float32, lay) for lay in layouts}
    if args.bf16:
        engines["tinkerd bf16"] = engine(torch.bfloat16, layouts[0])
    if not args.no_served:  # what a sample costs through the server: the decoder plus rescoring (engine/rescoring.py)
        host = ModelHost.from_directory("m", args.model_dir, EngineConfig(max_decode_batch=max(batches)))
        served = host.new_sampler()
        assert isinstance(served, Sampler)  # the builtin sampler (no --sampler vllm here)
        engines["tinkerd served (decode + rescore)"] = served

    if args.profile:
        profile(engines["tinkerd fp32"], all_prompts[: args.profile], steps=16, top_k=args.top_k)
        return

    n, k = args.new_tokens, args.top_k
    print(f"prompt length {len(all_prompts[0])}, {n} new tokens, temperature 1, top_k {k}, {args.threads} threads, ")
    print(f"best of {args.repeats} interleaved runs\n")
    columns = [*engines, *([] if args.skip_generate else ["generate fp32"])]
    print("| sequences | " + " | ".join(f"{c} tok/s" for c in columns) + " | tinkerd fp32 / generate |")
    print("|---" * (len(columns) + 2) + "|")
    for b in batches:
        batch = all_prompts[:b]
        runs: dict[str, Callable[[], object]] = {
            name: (lambda sampler=sampler, batch=batch: ours(sampler, batch, n, k)) for name, sampler in engines.items()
        }
        if not args.skip_generate:
            runs["generate fp32"] = lambda batch=batch: hf_generate(hf, batch, n, k)
        tps = {name: b * n / seconds for name, seconds in timed(runs, args.repeats).items()}
        ratio = f"{tps['tinkerd fp32'] / tps['generate fp32']:.2f}x" if "generate fp32" in tps else "-"
        print(f"| {b} | " + " | ".join(f"{tps[c]:.1f}" for c in columns) + f" | {ratio} |", flush=True)

    copy_bw, read_bw = bandwidths()
    nbytes = weight_bytes(hf)
    print("\n| batch-1 decode | ms/token | copy bound | vs copy bound | read bound | vs read bound |")
    print("|---|---|---|---|---|---|")
    for name, sampler in engines.items():
        scale = 2 if "bf16" in name else 1
        copy_ms, read_ms = nbytes / copy_bw * 1e3 / scale, nbytes / read_bw * 1e3 / scale
        ms = min(decode_ms_per_token(sampler, all_prompts[0], n) for _ in range(args.repeats))
        print(f"| {name} | {ms:.1f} | {copy_ms:.1f} | {ms / copy_ms:.2f}x | {read_ms:.1f} | {ms / read_ms:.2f}x |")
    print(
        f"\nweights {nbytes / 1e6:.0f} MB in fp32; bandwidth {copy_bw / 1e9:.1f} GB/s copied, "
        f"{read_bw / 1e9:.1f} GB/s read"
    )


if __name__ == "__main__":
    main()
