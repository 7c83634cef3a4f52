"""A split deployment as real processes: `tinkerd api`, `tinkerd trainer`s and `tinkerd sampler`s sharing one
PostgreSQL database and one checkpoint directory. Used by the split e2e and fault tests, and by the benches.

Each process is started as a service manager would start it (its own command line, its log in `logs/<name>.log`),
optionally inside a network namespace (`ip netns exec`). Processes can be killed with SIGKILL and started again with
the same command line (and so the same worker id and port).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tinkerd.store import Store
from tinkerd.store.workers import WorkerRegistry

CLI = [sys.executable, "-c", "from tinkerd.cli import main; main()"]
ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TINKERD_THREADS": "1", "TINKER_TELEMETRY": "0"}


@dataclass
class Member:
    """One process of the deployment and how to start it again."""

    name: str
    role: str  # api | trainer | sampler
    command: list[str]
    process: subprocess.Popen[str] | None = None


@dataclass
class SplitDeployment:
    root: Path
    database_url: str
    model: str  # the base model's directory (its name, as the SDK names it)
    lease_s: float = 3.0
    api_host: str = "127.0.0.1"
    api_port: int = 0
    env: dict[str, str] = field(default_factory=dict)  # added to every process's environment
    members: dict[str, Member] = field(default_factory=dict)

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def _common(self, database_url: str | None = None) -> list[str]:
        url = database_url or self.database_url
        return ["--database-url", url, "--storage", str(self.storage), "--lease-s", str(self.lease_s)]

    def add_api(
        self, name: str = "api", *, netns: str | None = None, database_url: str | None = None, host: str | None = None
    ) -> Member:
        if not self.api_port:
            from tests.pg_server import free_port

            self.api_port = free_port()
        if host is not None:
            self.api_host = host
        args = ["api", *self._common(database_url), "--host", self.api_host, "--port", str(self.api_port)]
        return self._add(name, "api", args, netns)

    def add_worker(
        self,
        role: str,
        name: str,
        *,
        netns: str | None = None,
        database_url: str | None = None,
        host: str = "127.0.0.1",
        extra: Sequence[str] = (),
    ) -> Member:
        args = [
            role, *self._common(database_url), "--model", self.model, "--cache-dir", str(self.root / "cache"),
            "--threads", "1", "--worker-id", name, "--host", host, *extra,
        ]  # fmt: skip
        return self._add(name, role, args, netns)

    def _add(self, name: str, role: str, args: list[str], netns: str | None) -> Member:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        member = Member(name, role, [*prefix, *CLI, *args])
        self.members[name] = member
        return member

    def start(self, names: Iterable[str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **ENV, **self.env}
        for name in names if names is not None else list(self.members):
            member = self.members[name]
            with (self.logs / f"{name}.log").open("a") as sink:
                member.process = subprocess.Popen(
                    member.command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=env
                )

    def process(self, name: str) -> subprocess.Popen[str]:
        process = self.members[name].process
        assert process is not None, f"{name} was never started"
        return process

    def kill(self, name: str) -> None:
        """kill -9: no shutdown code runs, the lease is not given back."""
        process = self.process(name)
        process.send_signal(signal.SIGKILL)
        process.wait(30)

    def alive(self, name: str) -> bool:
        process = self.members[name].process
        return process is not None and process.poll() is None

    def wait_ready(self, timeout_s: float = 480.0, names: Iterable[str] | None = None) -> None:
        """Until the api answers /healthz and every worker (of `names`, default all) is live in the ledger."""
        wanted = set(names if names is not None else self.members)
        workers = {n for n in wanted if self.members[n].role != "api"}
        deadline = time.monotonic() + timeout_s  # processes loading torch on a shared 2-core machine
        store = Store.open(self.database_url)
        try:
            registry = WorkerRegistry(store.db)
            while True:
                live = {w.id for w in registry.live()}
                up = all(self._api_up() for n in wanted if self.members[n].role == "api")
                if up and workers <= live:
                    return
                dead = [n for n in wanted if not self.alive(n)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"the deployment did not start ({dead} exited):\n{self.logs_text()}")
                time.sleep(0.3)
        finally:
            store.close()

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/api/v1/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def logs_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-20000:]}" for p in sorted(self.logs.glob("*.log")))

    def close(self) -> None:
        """SIGTERM every process still running (a clean stop), SIGKILL what does not stop."""
        for member in self.members.values():
            if member.process is not None and member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        for member in self.members.values():
            if member.process is None:
                continue
            try:
                member.process.wait(30)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()


@contextmanager
def running(
    root: Path, database_url: str, model: str, workers: Sequence[tuple[str, str]], lease_s: float
) -> Iterator[SplitDeployment]:
    """An api and ``workers`` ((role, name) pairs) started on a database whose schema is made first (before the
    processes race to create it), ready; closed on exit."""
    Store.open(database_url).close()
    found = SplitDeployment(root, database_url, model, lease_s=lease_s)
    found.add_api()
    for role, name in workers:
        found.add_worker(role, name)
    found.start()
    try:
        found.wait_ready()
        yield found
    finally:
        found.close()
