"""One trainer on several ranks: starting them, and the process of a follower rank.

`tinkerd serve --ranks N` (or `tinkerd trainer --ranks N`): the process the user started is rank 0; it starts ranks
1..N-1 as child processes running `tinkerd serve` with the variables torchrun would set (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so a rank started by tinkerd and one started by torchrun take the same path:
a `serve` or `trainer` command that finds itself at rank r > 0 runs ``run_follower`` instead. Rank 0 serves the API,
owns the ledger and the sampler, and drives training; the followers hold the same base models (whole, or their
shard of them: ``--base-sharding``) and adapters and run their share of every forward_backward (engine/distributed).

A rank that dies breaks the group: rank 0 fails its in-flight requests with a message naming what happened, stops,
and exits non-zero (``RanksLostError``); followers exit non-zero when rank 0 is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from tinkerd import hub
from tinkerd.domain.errors import ModelFetchError, SettingsError, TinkerdError
from tinkerd.engine.config import EngineConfig
from tinkerd.engine.distributed import Channel, DistributedServedModel, RankInfo, RankLostError, join_group
from tinkerd.engine.distributed.follower import follow
from tinkerd.engine.distributed.group import leave_group, rank_from_env
from tinkerd.engine.distributed.sharding import full_parameters, shard_served
from tinkerd.engine.served_model import ServedModel
from tinkerd.settings import Settings

log = logging.getLogger(__name__)

Announce = Callable[[str], None]
# Idle followers wait for their next command inside a collective: rank 0 pings them this often (or at a quarter of
# the timeout, if shorter), which also finds a dead rank while idle.
KEEPALIVE_S = 5.0
# After a rank is lost, in-flight requests are failed; their clients get this long to read the errors before exit.
LOST_GRACE_S = 3.0
_CHILD_STOP_S = 60.0  # a follower that left the group exits in well under a second, unless the machine is starved


class RanksLostError(TinkerdError):
    """A rank of this trainer died or went silent: the process stops with this message and exit code 1."""


def this_rank(settings: Settings) -> RankInfo | None:
    """This process's rank: torchrun's (or the launcher's) variables, else rank 0 of ``settings.ranks`` (None: 1)."""
    env = rank_from_env(os.environ)
    if env is not None:
        if settings.ranks not in (1, env.world_size):
            raise SettingsError(f"--ranks {settings.ranks} contradicts WORLD_SIZE={env.world_size} (torchrun's)")
        return env
    if settings.ranks == 1:
        return None
    return RankInfo(0, settings.ranks, 0, "127.0.0.1", _free_port())


def is_follower() -> bool:
    """Whether this process is rank r > 0 of a trainer (started by tinkerd or torchrun)."""
    info = rank_from_env(os.environ)
    return info is not None and not info.is_leader


def engine_config(settings: Settings, device: str) -> EngineConfig:
    """The engine's configuration on ``device`` (this rank's).

    On CUDA the sampler decodes from the trainer's own weights in the training dtype (bf16 by default): the fp32
    sampling copy that makes CPU decoding faster (memory-bound gemv) would cost a GPU 4 bytes per parameter.
    """
    rescore = settings.sample_scores == "trainer"
    engine = EngineConfig(device=device, num_threads=settings.threads, rescore_samples=rescore)
    if settings.dtype:
        engine = dataclasses.replace(engine, train_dtype=settings.dtype)
    if torch.device(device).type == "cuda":
        engine = dataclasses.replace(engine, sample_dtype=engine.train_dtype)
    if settings.base_sharding == "sharded":
        engine = dataclasses.replace(engine, shard_base=True)
        if rescore:
            # Rank 0's whole copy then samples and rescores (a sharded trainer cannot score alone): in the training
            # dtype and layout, so that samples report forward()'s logprobs. One copy, not an fp32 one beside it.
            engine = dataclasses.replace(engine, sample_dtype=engine.train_dtype, decode_layout=False)
    return engine


def check_sharding(settings: Settings, role: str = "serve") -> None:
    """Refuse, before anything loads, what a sharded base does not support (SettingsError naming it)."""
    if settings.base_sharding != "sharded":
        return
    if role == "sampler":
        raise SettingsError("--base-sharding sharded is for trainers; a sampler holds its base whole on one rank")
    world = rank_from_env(os.environ)
    if settings.ranks == 1 and world is None:
        raise SettingsError("--base-sharding sharded shards the base across ranks: it needs --ranks 2 or more")
    if role == "serve" and settings.sampler == "vllm":
        raise SettingsError(
            "--base-sharding sharded with --sampler vllm is not supported in serve; run a split deployment "
            "(a sharded `tinkerd trainer` and a `tinkerd sampler --sampler vllm`)"
        )


@dataclass
class Ranks:
    """Rank 0's side of a multi-rank trainer: the channel to the others, and the ranks it started itself."""

    info: RankInfo
    channel: Channel
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def device(self) -> str:
        return str(self.channel.device)

    def make_served(self, name: str, hf_model: torch.nn.Module, config: EngineConfig) -> ServedModel:
        served = DistributedServedModel(name, hf_model, config, self.channel)
        if config.shard_base:
            _shard(served, self.info.world_size)
        return served

    def on_lost(self, stop: Callable[[], None]) -> None:
        """When a rank is lost: after a grace period for in-flight errors to reach their clients, call ``stop``."""

        def lost(_message: str) -> None:
            timer = threading.Timer(LOST_GRACE_S, stop)
            timer.daemon = True
            timer.start()

        self.channel.on_lost = lost

    def close(self) -> None:
        ready = self.channel.ready
        self.channel.close()
        if not ready:  # stopped while starting (a model failed to load): the ranks this process started go too
            _kill(self.children)
        for child in self.children:
            try:
                child.wait(_CHILD_STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not exit; killing it", child.pid)
                child.kill()
                child.wait()


def start_ranks(settings: Settings, announce: Announce | None = None) -> Ranks | None:
    """Rank 0: start ranks 1..N-1 unless torchrun did, join the group, keep idle followers alive. None for 1 rank."""
    info = this_rank(settings)
    if info is None:
        return None
    assert info.is_leader, "a follower rank runs run_follower, not the trainer"
    children: list[subprocess.Popen[bytes]] = []
    if rank_from_env(os.environ) is None:
        children = [
            _spawn(settings, dataclasses.replace(info, rank=r, local_rank=r)) for r in range(1, info.world_size)
        ]
        if announce is not None:
            pids = ", ".join(f"rank {r}: pid {c.pid}" for r, c in enumerate(children, start=1))
            announce(f"trainer spans {info.world_size} ranks ({pids})")
    joined = threading.Event()
    if children:
        watcher = threading.Thread(
            target=_watch_start, args=(children, joined), name="tinkerd-ranks-start", daemon=True
        )
        watcher.start()
    try:
        device = join_group(info, settings.device, settings.rank_timeout_s, from_env=not children)
    except BaseException:
        _kill(children)
        raise
    finally:
        joined.set()
    return Ranks(info, channel=Channel(info, device, settings.rank_timeout_s), children=children)


def handshake(channel: Channel, served: Mapping[str, ServedModel]) -> None:
    """Every rank loaded the same base models the same way, or a SettingsError saying which rank differs.

    Every rank calls it once, after loading its models and before the first command."""
    try:
        prints = channel.all_gather(_fingerprint(served))
    except RankLostError as exc:
        raise SettingsError(f"a rank of the trainer did not come up (see its output): {exc}") from exc
    for rank, other in enumerate(prints):
        if other != prints[0]:
            raise SettingsError(f"rank {rank} loaded other base models than rank 0: {other} != {prints[0]}")
    if channel.info.is_leader:  # from now on every rank waits for commands: keep idle ones inside the timeout
        channel.start_keepalive(min(KEEPALIVE_S, channel.timeout_s / 4))


def _fingerprint(served: Mapping[str, ServedModel]) -> dict[str, tuple[int, float, str, int, bool]]:
    out: dict[str, tuple[int, float, str, int, bool]] = {}
    for name, model in sorted(served.items()):
        total, count = 0.0, 0
        for p in full_parameters(model.train.hf):  # a sharded base: gathered one weight at a time
            total += float(p.detach().sum(dtype=torch.float64))
            count += p.numel()
        config = model.config
        out[name] = (count, round(total, 3), config.train_dtype, config.max_tokens_per_pass, config.shard_base)
    return out


def run_follower(settings: Settings, announce: Announce = print) -> None:
    """A follower rank: join the group, load the base models, then run rank 0's commands until it stops."""
    info = rank_from_env(os.environ)
    assert info is not None and not info.is_leader
    device = join_group(info, settings.device, settings.rank_timeout_s, from_env=True)
    channel = Channel(info, device, settings.rank_timeout_s)
    try:
        engine = engine_config(settings, str(device))
        models = [_resolve(name, settings) for name in settings.models or (hub.DEFAULT_MODEL,)]
        served = {m.name: ServedModel.from_directory(m.name, m.path, engine) for m in models}
        if engine.shard_base:
            for model in served.values():  # in the order rank 0 loads them
                _shard(model, info.world_size)
        handshake(channel, served)
        announce(f"rank {info.rank}/{info.world_size} on {device}: following rank 0 ({', '.join(served)})")
        follow(channel, served)
    except RankLostError as exc:
        raise RanksLostError(str(exc)) from exc
    leave_group()
    announce(f"rank {info.rank}: stopped")


def _resolve(name: str, settings: Settings) -> hub.ResolvedModel:
    """A served model's directory; pulled if missing (under torchrun every rank starts at once; pulls are atomic)."""
    try:
        return hub.resolve_model(name, settings.cache_dir)
    except ModelFetchError:
        if name not in hub.CATALOG:
            raise
        hub.pull(name, settings.cache_dir, progress=False)
        return hub.resolve_model(name, settings.cache_dir)


def _spawn(settings: Settings, info: RankInfo) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-c",
        "from tinkerd.cli import main; main()",
        "serve",
        "--cache-dir",
        str(settings.cache_dir),
    ]
    for name in settings.models or (hub.DEFAULT_MODEL,):
        command += ["--model", name]
    command += ["--device", settings.device, "--ranks", str(info.world_size)]
    command += ["--rank-timeout-s", str(settings.rank_timeout_s), "--base-sharding", settings.base_sharding]
    if settings.dtype:
        command += ["--dtype", settings.dtype]
    if settings.threads:
        command += ["--threads", str(settings.threads)]
    env = {**os.environ, **info.env()}
    # A session of its own: Ctrl-C in the terminal reaches rank 0 only, which then stops the others in order.
    linux = sys.platform == "linux"
    return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_die_with_parent if linux else None)


def _watch_start(children: list[subprocess.Popen[bytes]], joined: threading.Event) -> None:
    """While rank 0 waits for the others to join (it cannot be interrupted there), a rank that exits means the
    group will never form: say so and exit now rather than after the whole timeout."""
    while not joined.wait(0.2):
        for rank, child in enumerate(children, start=1):
            code = child.poll()
            if code is not None and not joined.is_set():
                log.error("rank %d exited with code %s before joining the trainer's group (see its output)", rank, code)
                sys.stderr.write(f"error: rank {rank} of the trainer exited with code {code} while starting\n")
                _kill(children)
                os._exit(1)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when rank 0's process dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _kill(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _shard(served: ServedModel, world_size: int) -> None:
    """Shard a model's base across the ranks, then hand the freed whole weights back to the system."""
    shard_served(served, world_size)
    if served.device.type == "cpu":
        release_freed_memory()


def release_freed_memory() -> None:
    """Collect garbage and return freed heap memory to the system: on CPU glibc keeps freed memory in the process
    unless asked, so a sharded rank would go on holding the whole base's size (a no-op without glibc)."""
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)
