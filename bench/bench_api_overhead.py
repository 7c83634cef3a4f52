"""API overhead: an SDK call to its result for a 1-datum forward, against the engine call alone.

Starts `tinkerd serve` as a subprocess on 127.0.0.1 with a tiny random Llama (so the model's own time is small and
the overhead shows), drives it with the official tinker SDK, and times the same forward on a `ServedModel` in this
process. Prints p50 / p99 over N calls of each and the difference.

    .venv/bin/python -m bench.bench_api_overhead [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import tinker

from bench.common import serving
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


def time_sdk(url: str, model: str, calls: int) -> tuple[list[float], list[float]]:
    """Forward calls, and for scale get_server_capabilities calls (one HTTP round trip through the SDK, no work)."""
    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    trainer = service.create_lora_training_client(base_model=model, rank=8, seed=0)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(TOKENS),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(data=[*TOKENS[1:], 2], dtype="int64", shape=[len(TOKENS)]),
            "weights": tinker.TensorData(data=[1.0] * len(TOKENS), dtype="float32", shape=[len(TOKENS)]),
        },
    )
    times: list[float] = []
    for i in range(calls + 10):
        start = time.perf_counter()
        trainer.forward([datum], "cross_entropy").result()
        if i >= 10:  # warm-up
            times.append(time.perf_counter() - start)
    round_trips: list[float] = []
    for i in range(calls + 10):
        start = time.perf_counter()
        service.get_server_capabilities()
        if i >= 10:
            round_trips.append(time.perf_counter() - start)
    return times, round_trips


def time_engine(model_dir: Path, calls: int) -> list[float]:
    served = ServedModel.from_directory("tiny", model_dir, EngineConfig(num_threads=1))
    served.create_adapter("run", LoraConfig(rank=8, seed=0))
    datum = Datum(
        TOKENS,
        {"target_tokens": ArrayData.of_ints([*TOKENS[1:], 2]), "weights": ArrayData.of_floats([1.0] * len(TOKENS))},
    )
    times: list[float] = []
    for i in range(calls + 10):
        start = time.perf_counter()
        served.forward([ForwardJob("run", [datum], "cross_entropy")])
        if i >= 10:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)  # the SDK's deprecation notices, printed once per call site
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp))
        # One engine thread on both sides: what is compared is the path around the engine, not thread counts.
        with serving(model_dir, Path(tmp), "--threads", "1") as (url, _server):
            sdk_times, round_trips = time_sdk(url, str(model_dir), args.calls)
        sdk, round_trip = percentiles(sdk_times), percentiles(round_trips)
        engine = percentiles(time_engine(model_dir, args.calls))
    print(f"1-datum forward (8 tokens, tiny Llama), {args.calls} calls each after 10 warm-up calls\n")
    print("| path | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| SDK -> tinkerd serve -> result | {sdk[0]:.1f} | {sdk[1]:.1f} |")
    print(f"| engine call alone (ServedModel.forward) | {engine[0]:.1f} | {engine[1]:.1f} |")
    print(f"| overhead (difference) | {sdk[0] - engine[0]:.1f} | {sdk[1] - engine[1]:.1f} |")
    print(f"| for scale: SDK get_server_capabilities (1 round trip) | {round_trip[0]:.1f} | {round_trip[1]:.1f} |")


if __name__ == "__main__":
    main()
