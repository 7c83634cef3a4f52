"""Load: N concurrent SDK clients, each with its own training run on one base model, for several minutes, against
`tinkerd serve` (one process, SQLite) and then the split deployment (`tinkerd api` + 2 trainers + 1 sampler, each
its own process, on a PostgreSQL server the bench starts), printed side by side.

Every client loops: forward_backward (2 datums), optim_step; every 4th round a sample (2 sequences) from its own
sampling client; every 10th round save_state. Reports throughput, p50/p99 latency per operation (call to result),
each process's memory over time (RSS, sampled every 5 s), and checks the ledger at the end: every call the clients
made is there exactly once, completed (zero lost, zero duplicated, zero failed).

    .venv/bin/python -m bench.bench_load [--clients 16] [--seconds 300] [--model DIR] [--deployments serve,split]

Default model: a tiny random Llama (the API, scheduler and ledger are what is loaded, not the matmuls); --model
takes a Hugging Face directory, e.g. ~/.cache/tinkerd/models/HuggingFaceTB/SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import sqlalchemy
import tinker
from sqlalchemy import text

from bench.bench_api_overhead import percentiles, tiny_model_dir
from bench.common import serving, split_serving
from tinkerd.store.db import default_url

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
    # Ends the session (its heartbeats and telemetry would otherwise go on against a server stopped after its phase).
    service.close("success").result()


def memory_sampler(pids: dict[str, int], stop: threading.Event, samples: list[tuple[float, dict[str, float]]]) -> None:
    """RSS in MiB of each process, every 5 s (a process that has exited reads 0)."""
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    start = time.monotonic()
    while not stop.is_set():
        rss: dict[str, float] = {}
        for name, process in processes.items():
            try:
                rss[name] = process.memory_info().rss / 2**20
            except psutil.Error:
                rss[name] = 0.0
        samples.append((time.monotonic() - start, rss))
        stop.wait(5.0)


def ledger_check(database_url: str, logs: list[ClientLog]) -> list[str]:
    """Every call of every client in the ledger exactly once, completed; no failed or unfinished request."""
    problems: list[str] = []
    engine = sqlalchemy.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            states = dict(conn.execute(text("select state, count(*) from futures group by state")).all())
            if set(states) - {"completed"}:
                problems.append(f"ledger states: {states}")
            for log in logs:
                rows = conn.execute(
                    text("select kind, seq_id from futures where model_id = :run order by seq_id"), {"run": log.run_id}
                ).all()
                kinds = Counter(kind for kind, _ in rows)
                expected = {"create_model": 1, **{op: log.calls[op] for op in OPS if op != "sample"}}
                if {k: kinds.get(k, 0) for k in expected} != expected:
                    problems.append(f"{log.run_id}: ledger {dict(kinds)} != calls {expected}")
                seqs = [seq for _, seq in rows]
                if seqs != list(range(len(seqs))):
                    problems.append(f"{log.run_id}: seq_ids are not 0..{len(seqs) - 1} exactly once")
            samples = conn.execute(text("select count(*) from futures where kind = 'sample'")).scalar_one()
            made = sum(log.calls["sample"] for log in logs)
            if samples != made:
                problems.append(f"{samples} sample requests in the ledger, {made} made")
    finally:
        engine.dispose()
    return problems


@dataclass
class Phase:
    """One deployment's run of the load: what the clients saw, the processes' memory, the ledger check."""

    name: str
    elapsed: float = 0.0
    logs: list[ClientLog] = field(default_factory=list)
    memory: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def drive(phase: Phase, url: str, pids: dict[str, int], model: str, vocab: int, args: argparse.Namespace) -> None:
    stop = threading.Event()
    watcher = threading.Thread(target=memory_sampler, args=(pids, stop, phase.memory), daemon=True)
    watcher.start()
    phase.logs = [ClientLog() for _ in range(args.clients)]
    started = time.monotonic()
    stop_at = started + args.seconds
    threads = [
        threading.Thread(target=client, args=(i, url, model, vocab, stop_at, phase.logs[i]), daemon=True)
        for i in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.elapsed = time.monotonic() - started
    stop.set()
    watcher.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory (default: tiny)")
    parser.add_argument(
        "--deployments",
        default="serve,split",
        help="which to load, one after the other: serve (one process, SQLite), split (api + 2 trainers + 1 sampler "
        "on PostgreSQL); default both",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each engine process (default 1)")
    args = parser.parse_args()
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model or tiny_model_dir(root)
        vocab = 256 if args.model is None else 49152
        # Housekeeping must not purge delivered results before the ledger check: it keeps them 15 minutes.
        for name in args.deployments.split(","):
            phase = Phase(name)
            if name == "serve":
                (root / "serve").mkdir()
                with serving(model_dir, root / "serve", "--threads", str(args.threads)) as (url, server):
                    drive(phase, url, {"serve": server.pid}, str(model_dir), vocab, args)
                    phase.problems = ledger_check(default_url(root / "serve" / "data"), phase.logs)
            elif name == "split":
                env = {"TINKERD_THREADS": str(args.threads)}
                with split_serving(model_dir, root, env=env) as (url, pids, database_url):
                    drive(phase, url, pids, str(model_dir), vocab, args)
                    phase.problems = ledger_check(database_url, phase.logs)
            else:
                parser.error(f"unknown deployment {name!r}: serve or split")
            phases.append(phase)
    report(args, phases)


def report(args: argparse.Namespace, phases: list[Phase]) -> None:
    model = args.model.name if args.model else "tiny random Llama"
    print(f"{args.clients} SDK clients, one run each on {model}, {args.seconds:.0f} s per deployment")
    print(
        "(serve: one process on SQLite; split: tinkerd api + 2 trainers + 1 sampler on PostgreSQL; "
        f"{args.threads} torch thread(s) per engine process)\n"
    )
    print("| operation | " + " | ".join(f"{p.name} calls/s | {p.name} p50 ms | {p.name} p99 ms" for p in phases) + " |")
    print("|---|" + "---|---|---|" * len(phases))
    for op in OPS:
        cells = []
        for phase in phases:
            times = [t for log in phase.logs for t in log.latencies[op]]
            if times:
                p50, p99 = percentiles(times)
                cells.append(f"{len(times) / phase.elapsed:.1f} | {p50:.0f} | {p99:.0f}")
            else:
                cells.append("- | - | -")
        print(f"| {op} | " + " | ".join(cells) + " |")
    print()
    for phase in phases:
        tokens = sum(log.tokens for log in phase.logs)
        errors = [error for log in phase.logs for error in log.errors]
        print(f"{phase.name}: trained tokens {tokens} ({tokens / phase.elapsed:.0f}/s) in {phase.elapsed:.0f} s")
        print(f"{phase.name}: failed calls {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
        ledger = "every call exactly once, completed (0 lost, 0 duplicated)"
        print(f"{phase.name}: ledger check: " + (ledger if not phase.problems else "; ".join(phase.problems[:5])))
    print("\nRSS per process over time, MiB (sampled every 5 s; PostgreSQL's own processes not counted)\n")
    for phase in phases:
        names = list(phase.memory[0][1]) if phase.memory else []
        print(f"| {phase.name}: s | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        step = max(1, len(phase.memory) // 12)  # about a dozen rows, the last one always
        shown = phase.memory[::step] + ([phase.memory[-1]] if (len(phase.memory) - 1) % step else [])
        for t, rss in shown:
            print(f"| {t:.0f} | " + " | ".join(f"{rss.get(n, 0.0):.0f}" for n in names) + " |")
        for name in names:
            trend(phase.name, name, [(t, rss[name]) for t, rss in phase.memory])
        print()


def trend(phase: str, name: str, memory: list[tuple[float, float]]) -> None:
    settled = [(t, rss) for t, rss in memory if t >= 60]  # the first minute is warm-up (imports, first runs)
    if len(settled) >= 4:
        slope = statistics.linear_regression([t for t, _ in settled], [rss for _, rss in settled]).slope * 60
        print(
            f"{phase} {name}: after warm-up {settled[0][1]:.0f} -> {settled[-1][1]:.0f} MiB, max "
            f"{max(rss for _, rss in memory):.0f} MiB, trend {slope:+.1f} MiB/min over {len(settled)} samples"
        )


if __name__ == "__main__":
    main()
