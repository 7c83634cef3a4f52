"""Load: many SDK clients at once on one base model, for minutes; throughput, latency, lost results, memory.

Starts `tinkerd serve` as a subprocess with a tiny random Llama (the server's own path is what is loaded, not the
model's arithmetic) and runs N clients in threads, each its own ServiceClient and training run, looping:
forward_backward (4 datums of a length only this client uses) -> optim_step, every 4th step
save_weights_and_get_sampling_client + sample (2 samples of 16 tokens), every 10th step save_state.

Checks while running: every result arrives and has this client's shapes (a length only this client sends; a result
crossed between runs would show). Afterwards, from the server's ledger: one row per call the clients made (none
lost, none duplicated), each finished and delivered. The server's RSS is sampled every few seconds.

    .venv/bin/python -m bench.bench_load [--clients 16] [--seconds 180]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import psutil
import tinker
from sqlalchemy import func, select

from bench.served import serving, tiny_model_dir
from tinkerd.store import Store, default_url
from tinkerd.store.tables import futures

VOCAB = 256
T = TypeVar("T")
BATCH = 4


@dataclass
class ClientLog:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    tokens_trained: int = 0


def _datum(rng: random.Random, length: int) -> tinker.Datum:
    tokens = [rng.randrange(3, VOCAB) for _ in range(length + 1)]
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[length]),
            "weights": tinker.TensorData(data=[1.0] * length, dtype="float32", shape=[length]),
        },
    )


def run_client(index: int, url: str, model: str, deadline: float, log: ClientLog) -> None:
    rng = random.Random(index)
    length = 8 + index  # only this client sends sequences of this length
    service = tinker.ServiceClient(base_url=url, api_key=f"tml-load-{index}")
    trainer = service.create_lora_training_client(base_model=model, rank=8, seed=index)

    def timed(kind: str, call: Callable[[], T]) -> T | None:
        start = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            log.errors.append(f"client {index} {kind}: {type(exc).__name__}: {exc}")
            return None
        log.latencies[kind].append(time.perf_counter() - start)
        return result

    step = 0
    while time.monotonic() < deadline:
        data = [_datum(rng, length) for _ in range(BATCH)]
        out = timed("forward_backward", partial(_forward_backward, trainer, data))
        if out is not None:
            log.tokens_trained += BATCH * length
            lengths = [len(o["logprobs"].tolist()) for o in out.loss_fn_outputs]
            if lengths != [length] * BATCH:
                log.mismatches.append(f"client {index} step {step}: logprob lengths {lengths}, sent {length}")
        timed("optim_step", partial(_optim_step, trainer))
        if step % 4 == 0:
            sampler = timed("save_weights_for_sampler", trainer.save_weights_and_get_sampling_client)
            if sampler is not None:
                prompt = [rng.randrange(3, VOCAB) for _ in range(8)]
                got = timed("sample", partial(_sample, sampler, prompt))
                if got is not None and len(got.sequences) != 2:
                    log.mismatches.append(f"client {index} step {step}: {len(got.sequences)} samples, asked 2")
        if step % 10 == 9:
            timed("save_state", partial(_save_state, trainer, f"step-{step}"))
        step += 1


def _forward_backward(trainer: tinker.TrainingClient, data: list[tinker.Datum]) -> tinker.ForwardBackwardOutput:
    return trainer.forward_backward(data, "cross_entropy").result()


def _optim_step(trainer: tinker.TrainingClient) -> object:
    return trainer.optim_step(tinker.AdamParams(learning_rate=1e-3)).result()


def _sample(sampler: tinker.SamplingClient, prompt: list[int]) -> tinker.SampleResponse:
    params = tinker.SamplingParams(max_tokens=16, temperature=1.0, stop=[])
    return sampler.sample(prompt=tinker.ModelInput.from_ints(prompt), num_samples=2, sampling_params=params).result()


def _save_state(trainer: tinker.TrainingClient, name: str) -> object:
    return trainer.save_state(name).result()


def sample_rss(pid: int, stop: threading.Event, every_s: float, out: list[tuple[float, float]]) -> None:
    process = psutil.Process(pid)
    start = time.monotonic()
    while not stop.wait(every_s):
        try:
            out.append((time.monotonic() - start, process.memory_info().rss / 2**20))
        except psutil.Error:
            return


def ledger_counts(data_dir: Path) -> tuple[Counter[str], Counter[str], int]:
    """Rows by kind, finished rows by kind, and finished rows never delivered."""
    query = select(futures.c.kind, futures.c.state, futures.c.delivered_count, func.count()).group_by(
        futures.c.kind, futures.c.state, futures.c.delivered_count
    )
    store = Store.open(default_url(data_dir))
    try:
        rows: list[tuple[str, str, int, int]] = store.db.read(
            lambda conn: [(str(k), str(st), int(d), int(n)) for k, st, d, n in conn.execute(query)]
        )
    finally:
        store.close()
    total: Counter[str] = Counter()
    finished: Counter[str] = Counter()
    undelivered = 0
    for kind, state, delivered, count in rows:
        total[kind] += count
        if state in ("completed", "failed"):
            finished[kind] += count
            if delivered == 0 and kind != "missing":
                undelivered += count
    return total, finished, undelivered


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--rss-every", type=float, default=5.0)
    args = parser.parse_args()
    logs = [ClientLog() for _ in range(args.clients)]
    rss: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(Path(tmp))
        data_dir = Path(tmp) / "data"
        with serving(model_dir, data_dir) as served:
            stop = threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(served.pid, stop, args.rss_every, rss), daemon=True)
            sampler.start()
            started = time.monotonic()
            deadline = started + args.seconds
            threads = [
                threading.Thread(target=run_client, args=(i, served.url, str(model_dir), deadline, logs[i]))
                for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            stop.set()
            sampler.join()
            time.sleep(1.0)  # the server notes deliveries in batches every 0.5 s
        total, finished, undelivered = ledger_counts(data_dir)

    calls: Counter[str] = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    for log in logs:
        for kind, values in log.latencies.items():
            calls[kind] += len(values)
            latencies[kind] += values
    errors = [e for log in logs for e in log.errors]
    mismatches = [m for log in logs for m in log.mismatches]
    tokens = sum(log.tokens_trained for log in logs)

    print(f"{args.clients} SDK clients, separate runs on one base model (tiny Llama), {elapsed:.0f} s\n")
    print("| operation | calls | per s | p50 ms | p99 ms | ledger rows |")
    print("|---|---|---|---|---|---|")
    for kind in ("forward_backward", "optim_step", "save_weights_for_sampler", "sample", "save_state"):
        values = latencies.get(kind, [])
        if not values:
            continue
        row_kind = "save_weights" if kind == "save_state" else kind
        print(
            f"| {kind} | {len(values)} | {len(values) / elapsed:.1f} | {statistics.median(values) * 1000:.0f} "
            f"| {percentile(values, 0.99) * 1000:.0f} | {total.get(row_kind, 0)} |"
        )
    print(f"\ntraining tokens/s: {tokens / elapsed:.0f}")
    expected = {
        "forward_backward": calls["forward_backward"],
        "optim_step": calls["optim_step"],
        "save_weights_for_sampler": calls["save_weights_for_sampler"],
        "sample": calls["sample"],
        "save_weights": calls["save_state"],
    }
    lost = {k: v - finished.get(k, 0) for k, v in expected.items() if finished.get(k, 0) < v}
    extra = {k: total.get(k, 0) - v for k, v in expected.items() if total.get(k, 0) > v}
    print(f"client errors: {len(errors)}; shape mismatches (crossed results): {len(mismatches)}")
    for line in (errors + mismatches)[:10]:
        print(f"  {line}")
    print(f"ledger vs clients: lost {lost or 0}, extra rows {extra or 0}, finished but never delivered {undelivered}")
    if rss:
        print("\nserver RSS (MiB) over time:")
        step = max(1, len(rss) // 8)
        print("  " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in rss[::step]) + f", {rss[-1][0]:.0f}s {rss[-1][1]:.0f}")
        warm = [m for t, m in rss if t >= min(30.0, args.seconds / 3)]
        if len(warm) >= 2:
            print(f"  after warm-up: first {warm[0]:.0f}, last {warm[-1]:.0f}, max {max(warm):.0f}")


if __name__ == "__main__":
    main()
