"""Composition of the sampling engine each served model uses: the builtin sampler, or a supervised vLLM server.

Called where a process that samples is composed (``server.build`` for ``tinkerd serve``, ``roles.worker`` for
``tinkerd sampler``), after the models are loaded. With ``--sampler vllm`` every model gets its own vLLM server from
the environment ``make vllm`` builds; a missing environment or a server that does not come up stops tinkerd with a
``SettingsError`` naming the cause, before anything is served.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tinkerd import hub
from tinkerd.settings import Settings, SettingsError

if TYPE_CHECKING:
    from tinkerd.engine.vllm import VllmBackend
    from tinkerd.worker.hosts import ModelHost

Announce = Callable[[str], None]
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM 0.32's --max-lora-rank accepts


def start_samplers(
    settings: Settings,
    models: Sequence[hub.ResolvedModel],
    hosts: Mapping[str, ModelHost],
    work_root: Path,
    announce: Announce | None = None,
) -> list[VllmBackend]:
    """Attach the configured sampling engine to every host; returns the vLLM backends to close at shutdown."""
    if settings.sampler == "builtin":
        return []
    from tinkerd.domain.ops import LoraConfig
    from tinkerd.engine.lora import init_lora_weights
    from tinkerd.engine.vllm import VllmConfig, installed_python, start_backend, work_dir_for

    if settings.sample_logprobs == "sampled":
        raise SettingsError(
            "--sample-logprobs sampled does not work with --sampler vllm (vLLM does not report the cut distribution "
            "it drew from); use tempered or model"
        )
    if settings.vllm_max_lora_rank not in VLLM_LORA_RANKS:
        ranks = ", ".join(map(str, VLLM_LORA_RANKS))
        raise SettingsError(f"vllm_max_lora_rank must be one of vLLM's {ranks}; got {settings.vllm_max_lora_rank}")
    python = installed_python(settings.cache_dir, "cpu" if settings.device == "cpu" else "cuda")
    try:
        extra = tuple(shlex.split(settings.vllm_args))
    except ValueError as exc:
        raise SettingsError(f"vllm_args cannot be split into arguments: {exc}") from None
    backends: list[VllmBackend] = []
    try:
        for model in models:
            host = hosts[model.name]
            config = VllmConfig(
                python=python,
                model_dir=model.path,
                work_dir=work_dir_for(work_root, model.name),
                device=settings.device,
                max_adapters=settings.vllm_max_adapters,
                max_lora_rank=settings.vllm_max_lora_rank,
                max_model_len=host.sample_transformer.shape.max_positions,
                extra_args=extra,
            )
            if announce is not None:
                announce(f"Starting vLLM for {model.name} (log: {config.work_dir / 'vllm.log'}; 30-60 s on CPU)")
            # a zero-delta adapter of the attention and MLP layers: the first LoRA request after start is slow
            hf = host.sample_transformer.hf
            warm = init_lora_weights(hf, LoraConfig(rank=8, alpha=8.0, seed=0, train_unembed=False), host.served.device)
            backend = start_backend(config, model.name, warm_up=warm)
            backends.append(backend)
            host.use_vllm(backend)
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return backends
