"""`tinkerd serve` as a subprocess on 127.0.0.1 for the benchmarks that drive it through the SDK."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.engine.tiny_models import tiny_model

STARTUP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Served:
    url: str
    pid: int


def tiny_model_dir(root: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64, vocabulary 256) saved as a Hugging Face directory."""
    path = root / "tiny-llama"
    model: Any = tiny_model("llama", vocab_size=256)  # a PreTrainedModel, typed as a plain Module
    model.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, data_dir: Path, extra_args: Sequence[str] = ()) -> Iterator[Served]:
    """Start `tinkerd serve` for `model_dir`, wait until it answers, stop it (SIGTERM) on exit."""
    port = free_port()
    env = dict(os.environ, TINKER_TELEMETRY="0", HF_HUB_OFFLINE="1")
    tinkerd_cli = str(Path(sys.executable).with_name("tinkerd"))
    cmd = [tinkerd_cli, "serve", "--port", str(port), "--model", str(model_dir), "--data-dir", str(data_dir)]
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([*cmd, *extra_args], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                try:
                    if httpx.get(f"{url}/api/v1/healthz", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("tinkerd serve did not start:\n" + log_path.read_text())
                time.sleep(0.2)
            yield Served(url, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=60)
