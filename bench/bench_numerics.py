"""Sampler vs trainer: do the logprobs a sample reports equal forward()'s logprobs of the same tokens?

One served model as `tinkerd serve` builds it (ModelHost, the given training dtype, fp32 decode copy), an adapter
trained one step so that LoRA is in play, then samples at temperature 1 from a snapshot and scores the same tokens
with forward(). Prints, per configuration, the max and mean |sample logprob - forward logprob| for what the sampler
reports, and for the decoder's own numbers (the distribution the tokens were actually drawn from).

    .venv/bin/python -m bench.bench_numerics [--model-dir DIR] [--dtypes bfloat16 float32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.bench_training import make_batch, to_datums
from bench.common import default_model_dir
from tinkerd.domain.ops import AdamParams, LoraConfig, SamplingParams
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.served_model import ForwardJob
from tinkerd.engine.transformer import Transformer
from tinkerd.worker.hosts import ModelHost


def gaps(model_dir: Path, dtype: str, prompts: int, max_tokens: int) -> dict[str, tuple[float, float]]:
    host = ModelHost.from_directory("m", model_dir, EngineConfig(train_dtype=dtype))
    served = host.served
    served.create_adapter("run", LoraConfig(rank=32, seed=0))
    served.forward([ForwardJob("run", to_datums(make_batch([64] * 4, 49152)), "cross_entropy", backward=True)])
    served.optim_step("run", AdamParams(learning_rate=1e-3))
    weights = served.snapshot("run")
    prompt_seqs = make_batch([8 + 5 * i for i in range(prompts)], 49152, seed=3)
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=7)
    jobs = [SampleJob(prompt=p, params=params, num_samples=2, weights=weights) for p in prompt_seqs]
    reported = host.new_sampler().run(jobs)
    assert isinstance(host.sample_transformer, Transformer)  # the packed path: this bench measures its decoder
    decoder = Sampler(host.sample_transformer, host.decode_text).run(jobs)
    seqs: list[list[int]] = []
    for p, res in zip(prompt_seqs, reported, strict=True):
        seqs += [p + s.tokens for s in res.sequences]
    out = served.forward([ForwardJob("run", to_datums(seqs), "cross_entropy")])[0].loss_fn_outputs
    result: dict[str, tuple[float, float]] = {}
    for label, results in (("reported by sample", reported), ("decoder's own", decoder)):
        diffs: list[float] = []
        k = 0
        for p, res, ref in zip(prompt_seqs, results, reported, strict=True):
            for s, r in zip(res.sequences, ref.sequences, strict=True):
                forward_lp = out[k]["logprobs"].values[len(p) - 1 :]
                k += 1
                # the decoder-only run may draw other tokens once its numbers differ: compare the common prefix
                common = min(len(s.tokens), len(r.tokens))
                same = next((i for i in range(common) if s.tokens[i] != r.tokens[i]), common)
                diffs += [abs(a - b) for a, b in zip(s.logprobs[:same], forward_lp[:same], strict=True)]
        diffs_t = torch.tensor(diffs or [float("nan")])
        result[label] = (diffs_t.max().item(), diffs_t.mean().item())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| training dtype | logprobs | max abs gap | mean abs gap |")
    print("|---|---|---|---|")
    for dtype in args.dtypes:
        for label, (mx, mean) in gaps(args.model_dir, dtype, args.prompts, args.max_tokens).items():
            print(f"| {dtype} | {label} | {mx:.2e} | {mean:.2e} |")


if __name__ == "__main__":
    main()
