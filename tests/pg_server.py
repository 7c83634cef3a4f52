"""A real PostgreSQL server for tests: initdb in a temporary directory, a free loopback port, stopped after.

PostgreSQL refuses to run as root, and tests often run as root (CI containers). Then the server runs as an
unprivileged system user: `postgres` where the distribution made one, else `tinkerd-pg`, created on first use.
The binaries are found on PATH or in Debian's /usr/lib/postgresql/<version>/bin.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path

SUPERUSER = "tinkerd"
_FALLBACK_SYSTEM_USER = "tinkerd-pg"


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(debian[0]) if debian else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _system_user() -> str | None:
    """The user the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_SYSTEM_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_SYSTEM_USER],
        check=True,
        capture_output=True,
    )
    return _FALLBACK_SYSTEM_USER


class PostgresServer:
    """One server; `create_database` hands each test a fresh, empty database on it."""

    def __init__(
        self, listen_addresses: tuple[str, ...] = ("127.0.0.1",), trusted_networks: tuple[str, ...] = ()
    ) -> None:
        """`listen_addresses` beyond loopback and `trusted_networks` (CIDR, trusted without password like loopback)
        are for tests whose processes reach the server from other network namespaces."""
        initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError(
                "PostgreSQL binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql; "
                "install them (Debian: apt-get install postgresql)"
            )
        self._initdb = initdb
        self._pg_ctl = pg_ctl
        self._user = _system_user()
        self.root = Path(tempfile.mkdtemp(prefix="tinkerd-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = free_port()
        self._names = count()
        self._running = False
        self._listen = listen_addresses
        self._trusted = trusted_networks
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        command = list(args) if self._user is None else ["runuser", "-u", self._user, "--", *args]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if done.returncode != 0:
            log = self.log_path.read_text() if self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    def start(self) -> None:
        if not self.data_dir.exists():
            self._run(
                self._initdb, "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"
            )
            if self._trusted:
                with (self.data_dir / "pg_hba.conf").open("a") as hba:
                    hba.writelines(f"host all all {network} trust\n" for network in self._trusted)
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={','.join(self._listen)} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(self._pg_ctl, "-D", str(self.data_dir), "-l", str(self.log_path), "-o", options, "-w", "start")
        self._running = True

    def stop(self, mode: str = "fast") -> None:
        if self._running:
            self._run(self._pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w", "stop")
            self._running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop (every connection is cut; "fast" rolls back open transactions) and start again on the same port."""
        self.stop(mode)
        self.start()

    def url(self, database: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{host}:{self.port}/{database}"

    def create_database(self, prefix: str = "t", host: str = "127.0.0.1") -> str:
        """A new, empty namespace for one test; returns its SQLAlchemy URL.

        A schema in one shared database, made the connection's search_path, rather than a database per test:
        CREATE DATABASE copies a template and forces a checkpoint (about a second each on a loaded machine).
        """
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE SCHEMA "{name}"')  # type: ignore[arg-type]  # a name we made: no injection
        return f"{self.url(host=host)}?options=-csearch_path%3D{name}"

    def close(self) -> None:
        try:
            self.stop("immediate")  # no shutdown checkpoint: the data is thrown away
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres(
    listen_addresses: tuple[str, ...] = ("127.0.0.1",), trusted_networks: tuple[str, ...] = ()
) -> Iterator[PostgresServer]:
    server = PostgresServer(listen_addresses, trusted_networks)
    try:
        server.start()
        yield server
    finally:
        server.close()
