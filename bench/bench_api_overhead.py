"""API overhead: an SDK call to its result for a 1-datum forward, against the engine call alone.

Starts `tinkerd serve` as a subprocess on 127.0.0.1 with a tiny random Llama (so the model's own time is small and
the overhead shows), drives it with the official tinker SDK, and times the same forward on a `ServedModel` in this
process. Also (unless --no-split) the split deployment: `tinkerd api` and a `tinkerd trainer` as two processes on a
PostgreSQL server the bench starts, reached through the same SDK call. All are timed side by side, in alternating
blocks, so that a machine that speeds up or slows down during the run affects all alike. Prints p50 / p99 over N
calls of each and the differences.

    .venv/bin/python -m bench.bench_api_overhead [--calls 200] [--block 20] [--no-split]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tinker

from bench.common import serving, split_serving
from tests.engine.tiny_models import tiny_model
from tinkerd.domain.ops import ArrayData, Datum, LoraConfig
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.served_model import ForwardJob, ServedModel

TOKENS = [1, 5, 9, 33, 4, 7, 8, 9]


def tiny_model_dir(root: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64, vocabulary 256) saved as a Hugging Face directory."""
    path = root / "tiny-llama"
    model: Any = tiny_model("llama", vocab_size=256)  # a PreTrainedModel, typed as a plain Module
    model.save_pretrained(path)
    return path


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]


def sdk_forward(url: str, model: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """A 1-datum forward through the SDK, and for scale get_server_capabilities (one HTTP round trip, no work)."""
    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    trainer = service.create_lora_training_client(base_model=model, rank=8, seed=0)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(TOKENS),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(data=[*TOKENS[1:], 2], dtype="int64", shape=[len(TOKENS)]),
            "weights": tinker.TensorData(data=[1.0] * len(TOKENS), dtype="float32", shape=[len(TOKENS)]),
        },
    )
    return lambda: trainer.forward([datum], "cross_entropy").result(), service.get_server_capabilities


def engine_forward(model_dir: Path, dtype: str) -> Callable[[], object]:
    """The same forward on a ServedModel in this process, one engine thread (as the server is started with)."""
    served = ServedModel.from_directory("tiny", model_dir, EngineConfig(num_threads=1, train_dtype=dtype))
    served.create_adapter("run", LoraConfig(rank=8, seed=0))
    datum = Datum(
        TOKENS,
        {"target_tokens": ArrayData.of_ints([*TOKENS[1:], 2]), "weights": ArrayData.of_floats([1.0] * len(TOKENS))},
    )
    return lambda: served.forward([ForwardJob("run", [datum], "cross_entropy")])


def time_interleaved(fns: dict[str, Callable[[], object]], calls: int, block: int) -> dict[str, list[float]]:
    """`calls` timed calls of each function after 10 untimed ones, in alternating blocks of `block` calls."""
    for fn in fns.values():
        for _ in range(10):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(ts) < calls for ts in times.values()):
        for name, fn in fns.items():
            for _ in range(min(block, calls - len(times[name]))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)  # the SDK's deprecation notices, printed once per call site
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--block", type=int, default=20, help="calls of one kind before switching to the next")
    parser.add_argument("--dtype", default="bfloat16", help="the engine's training dtype, on both sides")
    parser.add_argument("--no-split", action="store_true", help="time `tinkerd serve` only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model_dir = tiny_model_dir(Path(tmp))
        # One engine thread on both sides: what is compared is the path around the engine, not thread counts.
        url, _server = stack.enter_context(serving(model_dir, Path(tmp), "--threads", "1", "--dtype", args.dtype))
        sdk, round_trip = sdk_forward(url, str(model_dir))
        fns = {"sdk": sdk, "engine": engine_forward(model_dir, args.dtype), "round_trip": round_trip}
        if not args.no_split:
            # The split deployment: tinkerd api and one trainer (no sampler needed) on PostgreSQL, same engine setup.
            env = {"TINKERD_THREADS": "1", "TINKERD_DTYPE": args.dtype}
            split_url, _pids, _db = stack.enter_context(split_serving(model_dir, Path(tmp), samplers=0, env=env))
            fns["split"], fns["split_round_trip"] = sdk_forward(split_url, str(model_dir))
        times = time_interleaved(fns, args.calls, args.block)
    p = {name: percentiles(ts) for name, ts in times.items()}
    print(f"1-datum forward (8 tokens, tiny Llama, {args.dtype}), {args.calls} calls each after 10 warm-up calls,")
    print(f"alternating in blocks of {args.block}\n")
    print("| path | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| SDK -> tinkerd serve -> result | {p['sdk'][0]:.1f} | {p['sdk'][1]:.1f} |")
    if "split" in p:
        split_path = "SDK -> tinkerd api -> PostgreSQL -> tinkerd trainer -> result"
        print(f"| {split_path} | {p['split'][0]:.1f} | {p['split'][1]:.1f} |")
    print(f"| engine call alone (ServedModel.forward) | {p['engine'][0]:.1f} | {p['engine'][1]:.1f} |")
    print(
        f"| overhead of serve (difference) | {p['sdk'][0] - p['engine'][0]:.1f} | {p['sdk'][1] - p['engine'][1]:.1f} |"
    )
    if "split" in p:
        split = (p["split"][0] - p["engine"][0], p["split"][1] - p["engine"][1])
        print(f"| overhead of the split deployment (difference) | {split[0]:.1f} | {split[1]:.1f} |")
    trip = p["round_trip"]
    print(f"| for scale: SDK get_server_capabilities (1 round trip) | {trip[0]:.1f} | {trip[1]:.1f} |")
    if "split_round_trip" in p:
        trip = p["split_round_trip"]
        print(f"| for scale: the same against tinkerd api | {trip[0]:.1f} | {trip[1]:.1f} |")


if __name__ == "__main__":
    main()
