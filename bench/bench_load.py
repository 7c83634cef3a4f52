"""Load: N concurrent SDK clients, each with its own training run on one base model, for several minutes.

Every client loops: forward_backward (2 datums), optim_step; every 4th round a sample (2 sequences) from its own
sampling client; every 10th round save_state. Reports throughput, p50/p99 latency per operation (call to result),
the server's memory over time (RSS of the `tinkerd serve` process, sampled every 5 s), and checks the ledger at the
end: every call the clients made is there exactly once, completed (zero lost, zero duplicated, zero failed).

    .venv/bin/python -m bench.bench_load [--clients 16] [--seconds 300] [--model DIR]

Default model: a tiny random Llama (the API, scheduler and ledger are what is loaded, not the matmuls); --model
takes a Hugging Face directory, e.g. ~/.cache/tinkerd/models/HuggingFaceTB/SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tinker

from bench.bench_api_overhead import percentiles, tiny_model_dir
from bench.common import serving

OPS = ("forward_backward", "optim_step", "sample", "save_weights")


@dataclass
class ClientLog:
    run_id: str = ""
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    calls: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    tokens: int = 0


def _datum(rng: random.Random, vocab: int, length: int) -> tinker.Datum:
    tokens = [rng.randrange(3, vocab) for _ in range(length + 1)]
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData(data=tokens[1:], dtype="int64", shape=[length]),
            "weights": tinker.TensorData(data=[1.0] * length, dtype="float32", shape=[length]),
        },
    )


def client(index: int, url: str, model: str, vocab: int, stop_at: float, log: ClientLog) -> None:
    rng = random.Random(index)
    service = tinker.ServiceClient(base_url=url, api_key="tml-bench")
    trainer = service.create_lora_training_client(base_model=model, rank=8, seed=index).result()
    log.run_id = trainer.model_id
    sampler = service.create_sampling_client(base_model=model).result()
    adam = tinker.AdamParams(learning_rate=1e-4)
    prompt = tinker.ModelInput.from_ints([rng.randrange(3, vocab) for _ in range(16)])
    params = tinker.SamplingParams(max_tokens=16, temperature=1.0)

    def timed(op: str, call: object) -> object:
        start = time.perf_counter()
        try:
            result = call.result()  # type: ignore[attr-defined]
        except Exception as error:  # counted, never hidden: a failed call is a finding
            log.errors.append(f"{op}: {type(error).__name__}: {error}")
            return None
        log.latencies[op].append(time.perf_counter() - start)
        log.calls[op] += 1
        return result

    round_ = 0
    while time.monotonic() < stop_at:
        batch = [_datum(rng, vocab, rng.randrange(16, 64)) for _ in range(2)]
        log.tokens += sum(d.model_input.length for d in batch)
        timed("forward_backward", trainer.forward_backward(batch, "cross_entropy"))
        timed("optim_step", trainer.optim_step(adam))
        if round_ % 4 == 0:
            timed("sample", sampler.sample(prompt, num_samples=2, sampling_params=params))
        if round_ % 10 == 9:
            timed("save_weights", trainer.save_state(f"r{round_}"))
        round_ += 1


def memory_sampler(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    process = psutil.Process(pid)
    start = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - start, process.memory_info().rss / 2**20))
        stop.wait(5.0)


def ledger_check(db: Path, logs: list[ClientLog]) -> list[str]:
    """Every call of every client in the ledger exactly once, completed; no failed or unfinished request."""
    problems: list[str] = []
    with sqlite3.connect(db) as conn:
        states = dict(conn.execute("select state, count(*) from futures group by state").fetchall())
        if set(states) - {"completed"}:
            problems.append(f"ledger states: {states}")
        for log in logs:
            rows = conn.execute(
                "select kind, seq_id from futures where model_id = ? order by seq_id", (log.run_id,)
            ).fetchall()
            kinds = Counter(kind for kind, _ in rows)
            expected = {"create_model": 1, **{op: log.calls[op] for op in OPS if op != "sample"}}
            if {k: kinds.get(k, 0) for k in expected} != expected:
                problems.append(f"{log.run_id}: ledger {dict(kinds)} != calls {expected}")
            seqs = [seq for _, seq in rows]
            if seqs != list(range(len(seqs))):
                problems.append(f"{log.run_id}: seq_ids are not 0..{len(seqs) - 1} exactly once")
        samples = conn.execute("select count(*) from futures where kind = 'sample'").fetchone()[0]
        if samples != sum(log.calls["sample"] for log in logs):
            problems.append(f"{samples} sample requests in the ledger, {sum(log.calls['sample'] for log in logs)} made")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory (default: tiny)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model or tiny_model_dir(root)
        vocab = 256 if args.model is None else 49152
        # Housekeeping must not purge delivered results before the ledger check: it keeps them 15 minutes.
        with serving(model_dir, root) as (url, server):
            stop = threading.Event()
            memory: list[tuple[float, float]] = []
            watcher = threading.Thread(target=memory_sampler, args=(server.pid, stop, memory), daemon=True)
            watcher.start()
            logs = [ClientLog() for _ in range(args.clients)]
            started = time.monotonic()
            stop_at = started + args.seconds
            threads = [
                threading.Thread(target=client, args=(i, url, str(model_dir), vocab, stop_at, logs[i]), daemon=True)
                for i in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            stop.set()
            watcher.join()
            problems = ledger_check(root / "data" / "tinkerd.db", logs)
    report(args, elapsed, logs, memory, problems)


def report(
    args: argparse.Namespace,
    elapsed: float,
    logs: list[ClientLog],
    memory: list[tuple[float, float]],
    problems: list[str],
) -> None:
    model = args.model.name if args.model else "tiny random Llama"
    print(f"{args.clients} SDK clients, one run each on {model}, {elapsed:.0f} s\n")
    print("| operation | calls | per second | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for op in OPS:
        times = [t for log in logs for t in log.latencies[op]]
        if times:
            p50, p99 = percentiles(times)
            print(f"| {op} | {len(times)} | {len(times) / elapsed:.1f} | {p50:.0f} | {p99:.0f} |")
    tokens = sum(log.tokens for log in logs)
    print(f"\ntrained tokens: {tokens} ({tokens / elapsed:.0f}/s)")
    errors = [error for log in logs for error in log.errors]
    print(f"failed calls: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
    print("ledger check: " + ("every call exactly once, completed" if not problems else "; ".join(problems[:5])))
    settled = [(t, rss) for t, rss in memory if t >= 60]  # the first minute is warm-up (imports, first runs)
    if len(settled) >= 4:
        first = [rss for t, rss in settled if t < 120]
        last = [rss for t, rss in settled if t >= settled[-1][0] - 60]
        slope = statistics.linear_regression([t for t, _ in settled], [rss for _, rss in settled]).slope * 60
        print(
            f"server RSS after warm-up: minute 2 {statistics.mean(first):.0f} MiB, last minute "
            f"{statistics.mean(last):.0f} MiB, max {max(rss for _, rss in memory):.0f} MiB, "
            f"trend {slope:+.1f} MiB/min over {len(settled)} samples"
        )


if __name__ == "__main__":
    main()
