"""Helpers shared by the benchmark scripts: model location, timing, memory, a `tinkerd serve` subprocess, and the
split deployment (api, trainers, sampler on PostgreSQL) as subprocesses."""

from __future__ import annotations

import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    cache = Path(os.environ.get("TINKERD_CACHE_DIR", Path.home() / ".cache" / "tinkerd"))
    return cache / "models" / DEFAULT_MODEL


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def serving(model_dir: Path, root: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`tinkerd serve` as a subprocess on a free 127.0.0.1 port, its log in root/serve.log; yields (url, process)
    once it answers, and stops it (SIGTERM) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1")
    tinkerd_cli = str(Path(sys.executable).with_name("tinkerd"))
    cmd = [tinkerd_cli, "serve", "--port", str(port), "--model", str(model_dir), "--data-dir", str(root / "data")]
    log_path = root / "serve.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([*cmd, *args], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/api/v1/healthz", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("tinkerd serve did not start:\n" + log_path.read_text())
                time.sleep(0.2)
            yield url, server
        finally:
            server.terminate()
            server.wait(timeout=30)


@contextmanager
def split_serving(
    model_dir: Path, root: Path, *, trainers: int = 2, samplers: int = 1, env: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, int], str]]:
    """The split deployment as subprocesses: a PostgreSQL server of its own (initdb in `root`), `tinkerd api`,
    `trainers` trainers and `samplers` samplers, logs in root/logs. Yields (url, pid by process name, database URL)
    once every role is up, and stops them all afterwards."""
    from tests.pg_server import running_postgres
    from tests.split_deployment import SplitDeployment
    from tinkerd.store import Store

    with running_postgres() as pg:
        database_url = pg.create_database("bench")
        Store.open(database_url).close()
        deployment = SplitDeployment(root / "split", database_url, str(model_dir), lease_s=10.0, env=dict(env or {}))
        deployment.add_api()
        for i in range(trainers):
            deployment.add_worker("trainer", f"trainer-{i + 1}")
        for i in range(samplers):
            deployment.add_worker("sampler", f"sampler-{i + 1}")
        deployment.start()
        try:
            deployment.wait_ready()
            yield deployment.url, {name: deployment.process(name).pid for name in deployment.members}, database_url
        finally:
            deployment.close()
