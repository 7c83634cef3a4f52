"""Sampling on vLLM against tinkerd's builtin sampler and transformers' ``generate``, side by side in one run.

Same model, same prompts, same distribution (temperature 1, top-k 50), every sequence ``--new-tokens`` new tokens
(end of sequence ignored); throughput counts the whole request, prefill included. The builtin sampler and vLLM run as
``tinkerd serve`` runs them: the builtin with its fp32 decode copy, vLLM (``--vllm-dtype``, float32 by default) in its
own process with every finished request rescored by the trainer's forward (the "vllm" column); "vllm raw" skips the
rescoring, to show vLLM alone. Then: 8 different adapters in one batch (``generate`` has no mixed-adapter batch),
the time from a new sampler version to its first token (vLLM: write the PEFT directory, load it, sample), and memory.

    .venv/bin/python bench/bench_vllm.py                      # SmolLM2 (`tinkerd models pull` first); ~15 minutes
    .venv/bin/python bench/bench_vllm.py --model-dir DIR --batches 1,2 --new-tokens 8 --repeats 1   # a smoke run

Needs vLLM's environment (`make vllm`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM

from bench.bench_sampling import hf_generate, prompts
from bench.common import default_model_dir, interleaved_medians
from tinkerd.domain.ops import LoraConfig, SampleResult, SamplingParams
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.lora import LoraWeights, init_lora_weights
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.transformer import Transformer
from tinkerd.engine.vllm import VllmConfig, VllmSampler, installed_python, start_backend
from tinkerd.worker.hosts import ModelHost

TOP_K = 50


def run(sampler: Sampler | VllmSampler, jobs: Sequence[SampleJob]) -> list[SampleResult]:
    tickets = [sampler.submit(job) for job in jobs]
    results: dict[int, SampleResult] = {}
    while sampler.has_work():
        for ticket, result in sampler.step():
            if isinstance(result, Exception):
                raise result
            results[ticket] = result
    return [results[t] for t in tickets]


def jobs_for(batch: list[list[int]], new_tokens: int, adapters: Sequence[LoraWeights | None]) -> list[SampleJob]:
    return [
        SampleJob(
            p,
            SamplingParams(max_tokens=new_tokens, temperature=1.0, top_k=TOP_K, seed=i),
            1,
            adapters[i % len(adapters)],
        )
        for i, p in enumerate(batch)
    ]


def adapter(host: ModelHost, seed: int, rank: int, unembed: bool = True) -> LoraWeights:
    """Attention, MLP and (with ``unembed``, the SDK's default) lm_head, with a small non-zero B."""
    hf = host.sample_transformer.hf
    w = init_lora_weights(hf, LoraConfig(rank=rank, alpha=rank, seed=seed, train_unembed=unembed), host.served.device)
    g = torch.Generator().manual_seed(seed)
    b = {name: torch.randn(t.shape, generator=g) * 0.01 for name, t in w.b.items()}
    return LoraWeights(w.rank, w.alpha, {k: v.detach() for k, v in w.a.items()}, b, frozen=True)


def rss_mib(pid: int, with_children: bool) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)] if with_children else [proc]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def first_token_s(sampler: Sampler | VllmSampler, make: Callable[[], LoraWeights], prompt: list[int], n: int) -> float:
    """Median seconds from a new version (weights in memory, as save_weights_and_get_sampling_client has them) to
    a one-token sample from it."""
    times = []
    for _ in range(n):
        weights = make()
        start = time.perf_counter()
        run(sampler, [SampleJob(prompt, SamplingParams(max_tokens=1, temperature=0.0), 1, weights)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "tinkerd")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--no-unembed", action="store_true", help="adapters without lm_head (train_unembed=False)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vllm-dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tinkerd-bench-vllm"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)

    rss_start = rss_mib(os.getpid(), with_children=False)
    host = ModelHost.from_directory(str(args.model_dir), args.model_dir, EngineConfig())  # as `tinkerd serve` loads
    builtin = host.sampler
    assert isinstance(builtin, Sampler)
    rss_builtin = rss_mib(os.getpid(), with_children=False)
    config = VllmConfig(
        python=installed_python(args.cache_dir),
        model_dir=args.model_dir,
        work_dir=args.work_dir,
        dtype=args.vllm_dtype,
        max_adapters=args.adapters + 8,
        max_loras_per_batch=args.adapters,
        max_lora_rank=max(args.rank, 8),
        max_model_len=host.sample_transformer.shape.max_positions,
        kv_cache_gib=args.kv_cache_gib,
    )
    started = time.perf_counter()
    backend = start_backend(config, str(args.model_dir), warm_up=adapter(host, 999, 8))
    print(f"vLLM started (and warmed up) in {time.perf_counter() - started:.1f} s; log {config.work_dir / 'vllm.log'}")
    try:
        shape, decode, trainer = host.sample_transformer.shape, host.decode_text, host.served.train
        served = VllmSampler(backend, shape, decode, scorer=trainer if isinstance(trainer, Transformer) else None)
        raw = VllmSampler(backend, shape, decode)
        hf = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32).eval()

        print(
            f"\n## Throughput, tokens/s ({args.new_tokens} new tokens per sequence, T=1, top-k {TOP_K}, base model)\n"
        )
        print("| sequences | builtin | vllm (rescored, as served) | vllm raw | generate | vllm / builtin |")
        print("|---|---|---|---|---|---|")
        for b in batches:
            batch = prompts(args.model_dir, b)
            jobs = jobs_for(batch, args.new_tokens, [None])
            fns: dict[str, Callable[[], object]] = {
                "builtin": lambda jobs=jobs: run(builtin, jobs),
                "vllm": lambda jobs=jobs: run(served, jobs),
                "raw": lambda jobs=jobs: run(raw, jobs),
                "generate": lambda batch=batch: hf_generate(hf, batch, args.new_tokens, TOP_K),
            }
            secs = interleaved_medians(fns, args.repeats)
            tps = {name: b * args.new_tokens / s for name, s in secs.items()}
            print(
                f"| {b} | {tps['builtin']:.1f} | {tps['vllm']:.1f} | {tps['raw']:.1f} | {tps['generate']:.1f} | "
                f"{tps['vllm'] / tps['builtin']:.2f}x |"
            )

        unembed = not args.no_unembed
        versions = [adapter(host, s, args.rank, unembed) for s in range(args.adapters)]
        b = max(batches)
        batch = prompts(args.model_dir, b)
        jobs = jobs_for(batch, args.new_tokens, versions)
        secs = interleaved_medians(
            {"builtin": lambda: run(builtin, jobs), "vllm": lambda: run(served, jobs)}, args.repeats
        )
        what = "attention, MLP and lm_head" if unembed else "attention and MLP"
        print(
            f"\n## {args.adapters} different adapters (rank {args.rank}, {what}) in one batch of {b} sequences, "
            "tokens/s\n"
        )
        print("| builtin | vllm (rescored) | vllm / builtin |\n|---|---|---|")
        tb, tv = (b * args.new_tokens / secs[k] for k in ("builtin", "vllm"))
        print(f"| {tb:.1f} | {tv:.1f} | {tv / tb:.2f}x |")

        prompt = batch[0]
        seeds = iter(range(10_000, 20_000))
        reps = max(args.repeats, 3)
        t_builtin = first_token_s(builtin, lambda: adapter(host, next(seeds), args.rank, unembed), prompt, reps)
        t_vllm = first_token_s(served, lambda: adapter(host, next(seeds), args.rank, unembed), prompt, reps)
        print("\n## A new sampler version to its first token (median), seconds\n")
        print("| builtin | vllm (write PEFT dir + load adapter + sample) |\n|---|---|")
        print(f"| {t_builtin:.3f} | {t_vllm:.3f} |")

        pid = backend.engine.pid
        vllm_rss = rss_mib(pid, with_children=True) if pid is not None else float("nan")
        print("\n## Memory (resident), MiB\n")
        print("| tinkerd process: model + builtin sampler | vLLM server + engine core processes |\n|---|---|")
        print(
            f"| {rss_builtin - rss_start:.0f} (whole process now: {rss_mib(os.getpid(), False):.0f}) | {vllm_rss:.0f} |"
        )
    finally:
        backend.close()


if __name__ == "__main__":
    main()
