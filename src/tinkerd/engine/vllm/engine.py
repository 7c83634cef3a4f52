"""One supervised vLLM server for one base model: started, watched, restarted with back-off, stopped.

The server is ``python -m vllm.entrypoints.openai.api_server`` from vLLM's own environment (``venv.py``), on a free
loopback port, with LoRA enabled and runtime adapter loading allowed. It runs in a process group of its own, because
vLLM starts its engine core as a child process: stopping or restarting kills the whole group, so no engine is left
behind holding memory.

Supervision: a monitor thread checks the process every ``POLL_S`` and its ``/health`` every ``HEALTH_EVERY_S`` (or at
once when a request saw the connection fail). A process that exited, or stopped answering health, is killed and
started again after a back-off that doubles from ``FIRST_BACKOFF_S`` to ``MAX_BACKOFF_S`` (reset once a start held for
a minute). Each successful start has a new ``generation``: adapters loaded into an earlier one are gone, and callers
load them again. Requests wait for the engine with ``wait_ready``; a start that fails at the very beginning is a
``VllmStartError`` (a ``SettingsError``: tinkerd stops with a clear message, not a hang).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tinkerd.domain.errors import SettingsError
from tinkerd.engine.vllm.http import EngineUnreachable, healthy

log = logging.getLogger(__name__)

POLL_S = 0.2
HEALTH_EVERY_S = 2.0
HEALTH_FAILURES_TO_RESTART = 3
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_AFTER_S = 60.0
_LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


class VllmStartError(SettingsError):
    """vLLM is missing, or its server did not come up (the message carries the end of its log)."""


@dataclass(frozen=True)
class VllmConfig:
    python: Path  # vLLM's environment's python
    model_dir: Path  # the base model, a Hugging Face directory with its tokenizer
    work_dir: Path  # the server's log and the adapter directories handed to it
    served_name: str = "base"  # the name requests use for the base model (adapters have their own)
    device: str = "cpu"
    dtype: str = "float32"  # bf16 on CPU diverges from the trainer's tokens (a 0.38 logprob gap measured)
    max_adapters: int = 16  # adapters registered at once; least recently used ones are unloaded beyond it
    max_loras_per_batch: int = 8
    max_lora_rank: int = 64
    max_logprobs: int = 64  # top-k widths vLLM computes (topk_prompt_logprobs beyond it get a 400)
    max_model_len: int | None = None
    kv_cache_gib: int = 2  # CPU only: VLLM_CPU_KVCACHE_SPACE
    threads_bind: str = ""  # VLLM_CPU_OMP_THREADS_BIND; "" = every core of this machine
    extra_args: tuple[str, ...] = ()  # appended last, so they override the flags above
    startup_timeout_s: float = 600.0  # 30-60 s on a quiet CPU machine; a loaded one can take many minutes

    def command(self, port: int) -> list[str]:
        argv = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--host", "127.0.0.1", "--port", str(port),
            "--model", str(self.model_dir), "--served-model-name", self.served_name,
            "--dtype", self.dtype,
            "--enable-lora", "--max-loras", str(self.max_loras_per_batch),
            "--max-cpu-loras", str(max(self.max_adapters, self.max_loras_per_batch)),
            "--max-lora-rank", str(self.max_lora_rank),
            "--max-logprobs", str(self.max_logprobs),
            # vLLM's neutral defaults, not the model's generation_config.json (a repetition penalty or stop ids there
            # would change what a request gets without asking for it; the builtin sampler ignores that file too)
            "--generation-config", "vllm",
            # No chunked prefill: vllm-cpu 0.32.0's engine dies ("CPU Generator does not use offset") when a seeded
            # request's prefill is split across steps, as it is once a batch's prompts exceed one step's token budget
            # (measured: 128 seeded 41-token prompts). Whole prefills only; the budget then covers max_model_len.
            "--no-enable-chunked-prefill",
            "--uvicorn-log-level", "warning",
        ]  # fmt: skip
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        return argv + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        # vLLM compiles a kernel (torch inductor, g++ on CPU) on the first request that asks for logprobs (cached
        # in torch's inductor cache afterwards); on a loaded machine that can outlast vLLM's default 300 s step
        # timeout, after which it declares its own worker hung
        env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        if self.device == "cpu":
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.threads_bind or f"0-{(os.cpu_count() or 1) - 1}"
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):  # tinkerd's, not vLLM's
            env.pop(name, None)
        return env


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when tinkerd dies, even by SIGKILL (Linux), so no vLLM outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Running:
    process: subprocess.Popen[bytes]
    base_url: str
    started_at: float = field(default_factory=time.monotonic)


class VllmEngine:
    """Start with ``start()`` (blocks until the server answers, or raises), stop with ``stop()``."""

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self.log_path = config.work_dir / "vllm.log"
        self.generation = 0  # bumped by every successful start
        self.restarts = 0
        self._running: _Running | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._check_now = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- the public surface ----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        running = self._running
        if running is None:
            raise EngineUnreachable("the vLLM engine is not running")
        return running.base_url

    @property
    def pid(self) -> int | None:
        running = self._running
        return running.process.pid if running is not None else None

    def start(self) -> None:
        """Start the server and its monitor; raises VllmStartError (with the log's end) if it does not come up."""
        if not self.config.python.is_file():
            raise VllmStartError(f"vLLM's python {self.config.python} does not exist; build it with `make vllm`")
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self._launch()
        self._monitor = threading.Thread(target=self._watch, name="tinkerd-vllm-monitor", daemon=True)
        self._monitor.start()

    def wait_ready(self, timeout: float) -> int:
        """Block until the engine serves (at most ``timeout`` s); returns its generation."""
        if not self._ready.wait(timeout) or self._stopping.is_set():
            raise EngineUnreachable(
                f"the vLLM engine is not serving (it is restarting after a failure; see {self.log_path})"
            )
        return self.generation

    def wait_recovered(self, generation: int, timeout: float) -> None:
        """After a request lost the engine of ``generation``: return once a new generation serves, or the old one
        proves healthy after all; raise EngineUnreachable if neither happens within ``timeout`` s."""
        self.suspect()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            running = self._running
            if (
                running is not None
                and self._ready.is_set()
                and (self.generation != generation or healthy(running.base_url, timeout=2.0))
            ):
                return
            time.sleep(0.2)
        raise EngineUnreachable(f"the vLLM engine did not come back within {timeout:.0f} s (see {self.log_path})")

    def suspect(self) -> None:
        """A request could not reach the engine: check on it now rather than at the next periodic check."""
        self._check_now.set()

    def stop(self) -> None:
        self._stopping.set()
        self._check_now.set()
        self._ready.clear()
        if self._monitor is not None:
            self._monitor.join(10)
        self._kill()

    # -- starting and stopping -------------------------------------------------------------------------------------

    def _launch(self) -> None:
        port = _free_port()
        with self.log_path.open("ab") as sink:
            sink.write(f"\n==== tinkerd starts vLLM (generation {self.generation + 1}) ====\n".encode())
            sink.flush()
            process = subprocess.Popen(
                self.config.command(port),
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.config.environment(),
                cwd=self.config.work_dir,
                start_new_session=True,  # its own process group: the engine core child goes with it
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        running = _Running(process, f"http://127.0.0.1:{port}")
        with self._lock:
            self._running = running
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not healthy(running.base_url, timeout=2.0):
            if process.poll() is not None:
                self._kill()
                raise VllmStartError(f"vLLM exited with code {process.returncode} while starting:\n{self._log_tail()}")
            if self._stopping.is_set() or time.monotonic() > deadline:
                self._kill()
                raise VllmStartError(
                    f"vLLM did not answer within {self.config.startup_timeout_s:.0f} s:\n{self._log_tail()}"
                )
            time.sleep(0.5)
        self.generation += 1
        self._ready.set()
        log.info("vLLM serves %s at %s (pid %d)", self.config.model_dir, running.base_url, process.pid)

    def _kill(self) -> None:
        with self._lock:
            running, self._running = self._running, None
        if running is None:
            return
        process = running.process
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                # the group may outlive its leader for a moment (the engine core): make sure it is gone
                os.killpg(process.pid, signal.SIGKILL)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                pass
            break
        if process.poll() is None:
            process.wait()

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    # -- supervision -----------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        backoff = FIRST_BACKOFF_S
        failures = 0
        next_health = time.monotonic() + HEALTH_EVERY_S
        while not self._stopping.is_set():
            forced = self._check_now.wait(POLL_S)
            self._check_now.clear()
            if self._stopping.is_set():
                return
            running = self._running
            dead = running is None or running.process.poll() is not None
            if not dead and (forced or time.monotonic() >= next_health):
                next_health = time.monotonic() + HEALTH_EVERY_S
                assert running is not None
                failures = 0 if healthy(running.base_url, timeout=5.0) else failures + 1
                dead = failures >= HEALTH_FAILURES_TO_RESTART
                if forced and failures and not dead:
                    self._check_now.set()  # keep checking closely until it answers or is declared dead
            if not dead:
                if running is not None and time.monotonic() - running.started_at > STABLE_AFTER_S:
                    backoff = FIRST_BACKOFF_S
                continue
            self._ready.clear()
            code = running.process.poll() if running is not None else None
            log.error("the vLLM engine died (exit code %s); restarting it in %.0f s", code, backoff)
            self._kill()
            failures = 0
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            try:
                self._launch()
                self.restarts += 1
            except VllmStartError as exc:
                log.error("restarting vLLM failed (next try in %.0f s): %s", backoff, exc)
