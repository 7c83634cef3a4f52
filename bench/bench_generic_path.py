"""The cost of the generic engine path: tokens/s of the packed forward vs the model's own forward, one family both run.

SmolLM2-135M-Instruct (Llama layout, so both paths can serve it), LoRA rank 16 on attention, MLP and unembedding.
Training: forward_backward of 4 sequences of 64 tokens through ``ServedModel``. Sampling: 4 sequences of 16 new
tokens after 32-token prompts through the packed ``Sampler`` (its KV cache), the ``GenericSampler`` (the model's own
cache) and the ``GenericSampler`` recomputing every prefix (``decode_with_cache=False``, its slow twin).
The generic path always computes in fp32, so the packed path is measured in fp32, and in bf16 too where the CPU
multiplies bf16 natively (AMX or AVX512-BF16; elsewhere bf16 is emulated and ``--dtype auto`` picks fp32).
All sides run in this one process on the same inputs, alternating call by call. The defaults take about 2 minutes
on a 2-core AVX2 CPU; on a shared machine run with ``OMP_NUM_THREADS=1`` (bench/RESULTS.md: with 2 threads every
small decode op waits for a thread another process holds, and sampling figures measure that instead).

``--tiny FAMILY`` builds a tiny random model instead (``llama``, the mixture of experts ``qwen3_moe``, or ``qwen3_5``
with its gated delta-net layers), to prove the script runs in seconds; its figures mean nothing. For a mixture of
experts the LoRA leaves the MLP out, since the generic path cannot adapt fused experts and both sides should do the
same work.

    .venv/bin/python -m bench.bench_generic_path [--model-dir DIR] [--repeats 3] [--seqs 4] [--tokens 64]
    .venv/bin/python -m bench.bench_generic_path --tiny llama --repeats 1 --seqs 2 --tokens 16 --new-tokens 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bench.common import default_model_dir, interleaved_medians
from tinkerd.domain.ops import ArrayData, Datum, LoraConfig, SamplingParams
from tinkerd.engine.config import EngineConfig, native_bf16
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.generic_sampler import GenericSampler
from tinkerd.engine.hybrid_sampler import HybridSampler
from tinkerd.engine.qwen3_5 import HybridTransformer
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import Sampler
from tinkerd.engine.served_model import ForwardJob, ServedModel


def served(model_dir: Path, dtype: str, generic: bool, lora: LoraConfig) -> ServedModel:
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    model = ServedModel("m", hf, EngineConfig(train_dtype=dtype))
    if generic:  # what a model of an unknown layout gets: the Hugging Face forward with LoRA hooks
        fresh = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
        model.train = GenericTransformer(fresh, torch.float32)
    model.create_adapter("a", lora)
    return model


def tiny_model_dir(family: str, root: Path) -> Path:
    """A tiny random model of ``family`` saved under ``root`` (the tests' configs, with a 1000-token vocabulary)."""
    from tests.engine.tiny_models import tiny_config, tiny_hybrid_config, tiny_moe_config

    if family == "qwen3_5":
        config = tiny_hybrid_config(family, vocab_size=1000)
    else:
        config = tiny_moe_config(family, vocab_size=1000) if family == "qwen3_moe" else tiny_config(family, 1000)
    torch.manual_seed(0)
    out = root / f"tiny-{family}"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    return out


def datums(vocab: int, n: int, length: int) -> list[Datum]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        s = torch.randint(3, vocab, (length + 1,), generator=g).tolist()
        weights = ArrayData.of_floats([1.0] * length)
        out.append(Datum(s[:-1], {"target_tokens": ArrayData.of_ints(s[1:]), "weights": weights}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seqs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per training sequence")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens sampled per sequence")
    parser.add_argument(
        "--tiny", choices=["llama", "qwen3_moe", "qwen3_5"], help="a tiny random model, to prove it runs"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(args.tiny, Path(tmp)) if args.tiny else args.model_dir
        run(model_dir, args)


def run(model_dir: Path, args: argparse.Namespace) -> None:
    moe = "moe" in str(AutoConfig.from_pretrained(str(model_dir), local_files_only=True).model_type)
    lora = LoraConfig(rank=16, alpha=32.0, seed=0, train_mlp=not moe)
    print(f"model {model_dir.name}; LoRA rank 16 on attention, {'' if lora.train_mlp else 'no '}MLP, unembedding")
    torch.manual_seed(0)
    bf16, why = native_bf16("cpu")
    if not bf16:  # emulated bf16 matmuls are ~100x slower than fp32: `--dtype auto` never picks them here
        print(f"packed bf16 not measured: {why}")
    sides = {
        **({"packed bf16": served(model_dir, "bfloat16", generic=False, lora=lora)} if bf16 else {}),
        "packed fp32": served(model_dir, "float32", generic=False, lora=lora),
        "generic fp32": served(model_dir, "float32", generic=True, lora=lora),
    }
    batch = datums(sides["packed fp32"].vocab_size, args.seqs, args.tokens)
    tokens = sum(len(d.tokens) for d in batch)

    def train(model: ServedModel) -> None:
        model.forward([ForwardJob("a", batch, "cross_entropy", backward=True)])
        for p in model.adapter("a").weights.parameters():
            p.grad = None

    train_s = interleaved_medians({k: (lambda m=m: train(m)) for k, m in sides.items()}, args.repeats)
    print(f"forward_backward, {args.seqs} x {args.tokens} tokens (median of {args.repeats}, interleaved):")
    for name, s in train_s.items():
        print(f"  {name:13s} {tokens / s:8.0f} tokens/s   ({s:.2f} s)   x{train_s['generic fp32'] / s:.1f} generic")

    samplers: dict[str, Sampler] = {}
    for name, model in sides.items():
        if isinstance(model.train, GenericTransformer):
            samplers[name] = GenericSampler(model.train)
            samplers["generic recompute"] = GenericSampler(model.train, decode_with_cache=False)
        elif isinstance(model.train, HybridTransformer):  # Qwen3.5: the cache also holds delta-net states
            samplers[name] = HybridSampler(model.train)
        else:
            samplers[name] = Sampler(model.train)
    models = {**sides, "generic recompute": sides["generic fp32"]}
    g = torch.Generator().manual_seed(1)
    vocab = min(1000, sides["packed fp32"].vocab_size)
    prompts = [torch.randint(3, vocab, (32,), generator=g).tolist() for _ in range(args.seqs)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=3)

    def sample(name: str) -> None:
        weights = models[name].snapshot("a")
        samplers[name].run([SampleJob(p, params, 1, weights) for p in prompts])

    sample_s = interleaved_medians({k: (lambda k=k: sample(k)) for k in samplers}, args.repeats)
    new = args.seqs * args.new_tokens
    print(
        f"sampling, {args.seqs} sequences x {args.new_tokens} new tokens after 32-token prompts ({args.repeats} runs):"
    )
    for name, s in sample_s.items():
        print(f"  {name:17s} {new / s:8.0f} tokens/s   ({s:.2f} s)   x{sample_s['generic fp32'] / s:.1f} generic")


if __name__ == "__main__":
    main()
