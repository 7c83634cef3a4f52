"""End to end: `tinkerd serve` as a subprocess on 127.0.0.1, driven by the official SDK.

The served model is a tiny random Llama with SmolLM2's real tokenizer (so stop strings and the SDK's tokenizer
loading work) and SmolLM2's vocabulary size (so every token id of that tokenizer exists). The tokenizer files come
from the local tinkerd cache, or are pulled once per session into a temporary cache (about 20 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tinkerd import hub
from tinkerd.settings import Settings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
SMOLLM2_VOCAB = 49152
STARTUP_TIMEOUT_S = 120.0
API_KEY = "tml-e2e"


@dataclass(frozen=True)
class Server:
    url: str
    model: str  # the served base model's name: the tiny model's directory
    process: subprocess.Popen[str]
    log: Path


@pytest.fixture(scope="session")
def tokenizer_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = hub.model_dir(Settings.load().cache_dir, hub.DEFAULT_MODEL)
    if (cached / "tokenizer.json").is_file():
        return cached
    cache = tmp_path_factory.mktemp("tinkerd-cache")
    return hub.pull(hub.DEFAULT_MODEL, cache, progress=False).path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_source: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from tests.engine.tiny_models import tiny_config

    out = tmp_path_factory.mktemp("models") / "tiny-smollm2"
    config = tiny_config("llama", vocab_size=SMOLLM2_VOCAB)
    config.max_position_embeddings = 512
    config.eos_token_id = 2  # SmolLM2's <|im_end|>
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, out / name)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tinkerd serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/api/v1/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"tinkerd serve did not answer within {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


def start_server(
    root: Path,
    model_dir: Path | str,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int = 0,
    cache_dir: Path | None = None,
) -> Server:
    """`tinkerd serve` in a subprocess, output to ``root/serve.log``; returns once it answers HTTP.

    ``model_dir`` is a model directory or a pulled model's name; ``cache_dir`` (default ``root/cache``) is where
    pulled models are looked up.
    """
    port = port or free_port()
    log = root / "serve.log"
    command = [
        sys.executable, "-c", "from tinkerd.cli import main; main()", "serve", "--host", "127.0.0.1",
        "--model", str(model_dir), "--data-dir", str(root / "data"), "--cache-dir", str(cache_dir or root / "cache"),
        *args,
    ]  # fmt: skip
    if "TINKERD_PORT" not in (env or {}):
        command += ["--port", str(port)]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", **(env or {})}
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True, env=full_env)
    url = f"http://127.0.0.1:{(env or {}).get('TINKERD_PORT', port)}"
    try:
        _wait_until_up(url, process, log)
    except BaseException:
        stop_server(process)
        raise
    return Server(url, str(model_dir), process, log)


def stop_server(process: subprocess.Popen[str]) -> int:
    """SIGTERM, as a service manager would stop it; the exit code it ended with."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("serve"), tiny_model_dir)
    try:
        yield running
    finally:
        stop_server(running.process)


@pytest.fixture(autouse=True)
def _sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Telemetry stays on: the server must accept it. Tokenizers load from local directories only.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TINKER_BASE_URL", raising=False)
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
