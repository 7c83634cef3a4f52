"""Checkpoints on disk: a PEFT-compatible LoRA adapter, optional optimizer state and our metadata, written atomically.

A checkpoint is a directory that PEFT and vLLM load as it is::

    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], ….lora_B.weight [out, r], fp32
    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, …
    optimizer.safetensors       the optimizer's flat tensor dict (only in `weights/` checkpoints)
    tinkerd_checkpoint.json     what PEFT has no field for: seed, train_* flags, module order, sizes, user metadata

The adapters of MoE experts are written one module per expert, ``<block>.experts.<e>.gate_proj`` (see
``expert_lora.py``).

A save writes a hidden sibling directory and swaps it into place, so readers see the old checkpoint or the new one,
never a mix. Directories whose names start with "." beside checkpoints are ours (in-flight or stale saves).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tinkerd.domain.errors import ConflictError, InvalidRequestError, NotFoundError
from tinkerd.domain.ops import LoraConfig
from tinkerd.engine import atomic_dir
from tinkerd.engine.expert_lora import check_expert_compatible, merge_experts, per_expert, stack_experts
from tinkerd.engine.lora import LoraWeights, validate_lora_config
from tinkerd.engine.lora_targets import VISION_PARTS, enabled_roles, is_expert_param, module_role

FORMAT_VERSION = 1
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.safetensors"
TINKERD_METADATA = "tinkerd_checkpoint.json"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps LoraModel wraps the HF model: two levels of prefix
# A temp dir of another checkpoint name is only swept once this old, so a concurrent save of it is left alone.
_EMBEDDING_LEAVES = ("embed_tokens", "lm_head")
# adapter_config.json fields that change the math of a plain LoRA: refuse rather than silently drop them
_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "bias", "modules_to_save", "rank_pattern", "alpha_pattern")


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    weights: LoraWeights  # fp32, requires_grad False: the caller decides whether it trains them
    lora: LoraConfig
    base_model: str  # "" when a plain PEFT adapter does not say
    optimizer_state: dict[str, torch.Tensor] | None
    metadata: dict[str, object]  # the user metadata given to save_checkpoint ({} for a plain PEFT adapter)
    created_at: datetime | None = None
    # the rest of tinkerd_checkpoint.json: format_version, modules, has_optimizer_state, sizes
    extra: dict[str, object] = dataclasses.field(default_factory=dict)


# -- saving ----------------------------------------------------------------------------------------------------------


def save_checkpoint(
    dest: Path,
    weights: LoraWeights,
    lora: LoraConfig,
    base_model: str,
    optimizer_state: Mapping[str, torch.Tensor] | None,
    metadata: Mapping[str, object],
) -> None:
    """Write a checkpoint directory at ``dest``, replacing any old one atomically.

    Saves to one ``dest`` must be serialised by the caller (the worker runs a model's requests in order)."""
    dest = Path(dest)
    if weights.rank != lora.rank or weights.alpha != lora.alpha:
        raise ValueError(f"weights (r={weights.rank}, alpha={weights.alpha}) disagree with {lora}")
    _check_factors(weights, enabled_roles(lora))
    try:  # validate before touching the disk: a bad value is the user's, a half-written dir would be ours
        user_json = json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"checkpoint metadata must be plain JSON: {exc}") from None
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ConflictError(f"checkpoint destination {dest.name!r} exists and is not a directory")

    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir.recover(dest)
    atomic_dir.sweep_side_dirs(dest)
    tmp = atomic_dir.side_dir(dest, "tmp")
    tmp.mkdir()
    try:
        _write_safetensors(tmp / ADAPTER_WEIGHTS, _peft_tensors(weights))
        _write_json(tmp / ADAPTER_CONFIG, _peft_config(weights, base_model))
        if optimizer_state is not None:
            _write_safetensors(tmp / OPTIMIZER_STATE, {k: _owned_cpu(v) for k, v in optimizer_state.items()})
        opt_bytes = (tmp / OPTIMIZER_STATE).stat().st_size if optimizer_state is not None else 0
        info = {
            "format": "tinkerd-checkpoint",
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "base_model": base_model,
            "lora": dataclasses.asdict(lora),  # rank, alpha, seed, train_attn, train_mlp, train_unembed
            # safetensors sorts keys; the optimizer's state is indexed by parameter order, so keep the order here
            "modules": list(weights.a),
            "has_optimizer_state": optimizer_state is not None,
            "sizes": {
                "num_parameters": weights.num_parameters(),
                "adapter_bytes": (tmp / ADAPTER_WEIGHTS).stat().st_size,
                "optimizer_bytes": opt_bytes,
            },
            "metadata": user_json,
        }
        _write_json(tmp / TINKERD_METADATA, info)
        atomic_dir.fsync_dir(tmp)
        atomic_dir.install(tmp, dest)
    except Exception:
        # An ordinary failure (disk full, bad tensor) cleans up now; a real crash leaves tmp for the next save's sweep.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_peft_adapter(dest: Path, weights: LoraWeights, base_model: str) -> None:
    """Write only the PEFT part of a checkpoint (what vLLM loads as a LoRA adapter) into a new directory ``dest``."""
    dest.mkdir(parents=True)
    _write_safetensors(dest / ADAPTER_WEIGHTS, _peft_tensors(weights))
    _write_json(dest / ADAPTER_CONFIG, _peft_config(weights, base_model))


def _peft_tensors(weights: LoraWeights) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name in weights.a:
        a, b = weights.a[name], weights.b[name]
        for module, (a_r_in, b_out_r) in (per_expert(name, a, b) if is_expert_param(name) else {name: (a, b)}).items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = _owned_cpu(a_r_in).float()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = _owned_cpu(b_out_r).float()
    return tensors


def _peft_config(weights: LoraWeights, base_model: str) -> dict[str, object]:
    alpha = weights.alpha
    extra: dict[str, object] = {}
    if any(".language_model." in f".{name}" for name in weights.a):
        # A vision-language model: its vision tower has layers named like the language model's (Qwen2.5-VL's
        # gate/up/down_proj), which PEFT would otherwise wrap too, with no weights in the file.
        extra["exclude_modules"] = rf"(.*\.)?({'|'.join(sorted(VISION_PARTS))})\..*"
    return {
        **extra,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": weights.rank,
        # vLLM types lora_alpha as int; write an int whenever that loses nothing
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in weights.a}),
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _owned_cpu(t: torch.Tensor) -> torch.Tensor:
    # a fresh contiguous copy: safetensors refuses views and tensors that share storage
    return t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


# -- loading ---------------------------------------------------------------------------------------------------------


def load_checkpoint(
    src: Path, device: torch.device | str, model: nn.Module | None = None, load_optimizer: bool = True
) -> LoadedCheckpoint:
    """Read a checkpoint written by ``save_checkpoint``, or a plain PEFT LoRA adapter directory.

    With ``model``, also checks the adapter fits it (``check_compatible``). Errors name files inside the checkpoint,
    never server paths."""
    src = Path(src)
    atomic_dir.recover(src)
    if not src.is_dir():
        raise NotFoundError(f"checkpoint {src.name!r} not found")
    config = _read_json(src, ADAPTER_CONFIG)
    weights = _weights_from_peft(_read_safetensors(src, ADAPTER_WEIGHTS, device), config)
    if (src / TINKERD_METADATA).exists():
        loaded = _with_metadata(_read_json(src, TINKERD_METADATA), weights)
    else:
        loaded = _plain_peft(config, weights, model)
    _check_factors(loaded.weights, enabled_roles(loaded.lora))
    try:
        validate_lora_config(loaded.lora)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"checkpoint {src.name!r}: {exc}") from None
    if model is not None:
        check_compatible(loaded.weights, model)
    if load_optimizer and (loaded.extra.get("has_optimizer_state") or (src / OPTIMIZER_STATE).exists()):
        loaded = dataclasses.replace(loaded, optimizer_state=_read_safetensors(src, OPTIMIZER_STATE, device))
    return loaded


def _plain_peft(config: dict[str, object], weights: LoraWeights, model: nn.Module | None) -> LoadedCheckpoint:
    """An adapter PEFT wrote: infer what PEFT does not record."""
    roles = {module_role(name) for name in weights.a}
    attn, mlp, unembed = "attn" in roles, "mlp" in roles, "unembed" in roles
    lora = LoraConfig(weights.rank, weights.alpha, None, train_attn=attn, train_mlp=mlp, train_unembed=unembed)
    if model is not None:  # the order init_lora_weights uses, so a fresh optimizer enumerates the same way
        position = {name: i for i, (name, _) in enumerate(model.named_modules())}
        names = sorted(weights.a, key=lambda n: position.get(n, len(position)))
        weights = LoraWeights(weights.rank, weights.alpha, {n: weights.a[n] for n in names}, weights.b)
    return LoadedCheckpoint(weights, lora, str(config.get("base_model_name_or_path") or ""), None, {})


def _weights_from_peft(tensors: dict[str, torch.Tensor], config: dict[str, object]) -> LoraWeights:
    if config.get("peft_type") != "LORA":
        raise InvalidRequestError(f"{ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r} is not LORA")
    # target_parameters: LoRA on fused 3-D parameters (what a GPT-OSS PEFT export holds), not read back (yet)
    extra = ("trainable_token_indices", "target_parameters")
    bad = [k for k in (*_UNSUPPORTED, *extra) if config.get(k) not in (None, False, "none", {}, [])]
    if bad:
        raise InvalidRequestError(f"{ADAPTER_CONFIG}: unsupported LoRA features {bad}; only plain LoRA is supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(alpha, int | float):
        raise InvalidRequestError(f"{ADAPTER_CONFIG}: r and lora_alpha must be numbers, got {rank!r}, {alpha!r}")
    # rsLoRA scales by alpha/sqrt(r); express that as our alpha/r with an equivalent alpha
    alpha = float(alpha) * math.sqrt(rank) if config.get("use_rslora") else float(alpha)

    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        rest = key.removeprefix(PEFT_PREFIX)
        if rest.endswith(".lora_A.weight") and key.startswith(PEFT_PREFIX):
            a[rest.removesuffix(".lora_A.weight")] = t.float()
        elif rest.endswith(".lora_B.weight") and key.startswith(PEFT_PREFIX):
            b[rest.removesuffix(".lora_B.weight")] = t.float()
        elif _is_base_embedding_copy(rest):
            continue  # PEFT copies the (frozen) base embedding into adapters that target lm_head; we use the base
        else:
            raise InvalidRequestError(f"{ADAPTER_WEIGHTS}: unsupported tensor {key!r} (only LoRA A/B of linear layers)")
    stack_experts(a, b)  # one module per expert on disk, stacked per projection in memory
    names = sorted(a, key=_natural_key)  # safetensors sorts keys as strings: put layer 10 after layer 9
    return LoraWeights(rank=rank, alpha=alpha, a={n: a[n] for n in names}, b=dict(sorted(b.items())))


def _is_base_embedding_copy(name: str) -> bool:
    module = name.removesuffix(".weight").removesuffix(".base_layer")
    return name.endswith(".weight") and module.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def _with_metadata(info: dict[str, object], weights: LoraWeights) -> LoadedCheckpoint:
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InvalidRequestError(f"{TINKERD_METADATA}: format_version {version!r} is not one this tinkerd reads")
    raw, modules, user = info.get("lora"), info.get("modules"), info.get("metadata", {})
    if not (isinstance(raw, dict) and isinstance(modules, list) and isinstance(user, dict)):
        raise InvalidRequestError(f"{TINKERD_METADATA} is malformed")
    try:
        lora = LoraConfig(**{f.name: raw[f.name] for f in dataclasses.fields(LoraConfig)})
        created_at = datetime.fromisoformat(str(info["created_at"]))
        agree = lora.rank == weights.rank and math.isclose(lora.alpha, weights.alpha, rel_tol=1e-9)
    except InvalidRequestError:  # a ValueError too, and already says what is wrong
        raise
    except (KeyError, TypeError, ValueError):
        raise InvalidRequestError(f"{TINKERD_METADATA} is malformed") from None
    if not agree:
        raise InvalidRequestError(f"{TINKERD_METADATA} and {ADAPTER_CONFIG} disagree on rank or alpha")
    names = [str(n) for n in modules]
    if sorted(names) != sorted(weights.a) or sorted(weights.a) != sorted(weights.b):
        raise InvalidRequestError(f"{TINKERD_METADATA} lists different modules than {ADAPTER_WEIGHTS} holds")
    ordered = LoraWeights(lora.rank, lora.alpha, {n: weights.a[n] for n in names}, {n: weights.b[n] for n in names})
    extra = {k: v for k, v in info.items() if k not in ("lora", "base_model", "metadata", "created_at")}
    return LoadedCheckpoint(ordered, lora, str(info.get("base_model") or ""), None, user, created_at, extra)


def _read_json(src: Path, name: str) -> dict[str, object]:
    path = src / name
    if not path.is_file():
        raise InvalidRequestError(f"checkpoint {src.name!r} is missing {name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise InvalidRequestError(f"checkpoint {src.name!r}: {name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"checkpoint {src.name!r}: {name} is not a JSON object")
    return data


def _read_safetensors(src: Path, name: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    path = src / name
    if not path.is_file():
        hint = " (PEFT .bin adapters are not read: they are pickles)" if (src / "adapter_model.bin").exists() else ""
        raise InvalidRequestError(f"checkpoint {src.name!r} is missing {name}{hint}")
    try:
        return load_file(path, device=str(device))
    except Exception:  # safetensors raises its own error type (and others) for truncated or garbled files
        raise InvalidRequestError(f"checkpoint {src.name!r}: {name} is corrupt") from None


# -- checks and merging ----------------------------------------------------------------------------------------------


def _check_factors(weights: LoraWeights, allowed_roles: frozenset[str]) -> None:
    """A and B pair up, have rank r, and sit only on modules the config trains (our forward applies no others)."""
    if not weights.a:
        raise InvalidRequestError("adapter has no LoRA weights")
    if set(weights.a) != set(weights.b):
        raise InvalidRequestError(f"adapter has unpaired LoRA factors: {sorted(set(weights.a) ^ set(weights.b))}")
    for name, a in weights.a.items():
        b = weights.b[name]
        # the experts of a sparse block stack one adapter per expert: A [E, r, in], B [E, out, r]
        dims = 3 if is_expert_param(name) else 2
        stacked = dims == 2 or (a.dim() == b.dim() == 3 and a.shape[0] == b.shape[0])
        ranked = a.dim() == b.dim() == dims and a.shape[-2] == b.shape[-1] == weights.rank
        if not (stacked and ranked):
            shapes = (tuple(a.shape), tuple(b.shape))
            raise InvalidRequestError(f"LoRA factors of {name!r} have shapes {shapes}, not rank {weights.rank}")
        if module_role(name) not in allowed_roles:
            raise InvalidRequestError(f"adapter targets {name!r}, outside what this LoRA config trains")


def check_compatible(weights: LoraWeights, model: nn.Module) -> None:
    """Every adapted module exists in ``model`` as a linear layer with matching in/out features."""
    modules = dict(model.named_modules())
    for name, a_r_in in weights.a.items():
        if is_expert_param(name):
            check_expert_compatible(name, weights, modules)
            continue
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise InvalidRequestError(f"adapter targets {name!r}, which the base model has no linear layer for")
        out_features, in_features = weights.b[name].shape[0], a_r_in.shape[1]
        if (linear.out_features, linear.in_features) != (out_features, in_features):
            raise InvalidRequestError(
                f"adapter for {name!r} is [{out_features} x {in_features}] but the base model's layer is "
                f"[{linear.out_features} x {linear.in_features}]: the adapter was trained on a different base model"
            )


def merge_into(model: nn.Module, weights: LoraWeights) -> None:
    """Add ``scale * B @ A`` into the base linear weights in place (for exporting a merged model)."""
    check_compatible(weights, model)  # before touching anything, so a mismatch cannot leave a half-merged model
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    untied = False
    with torch.no_grad():
        for name in weights.a:
            if is_expert_param(name):
                merge_experts(model, weights, name)
                continue
            linear = model.get_submodule(name)
            assert isinstance(linear, nn.Linear)
            if uses[id(linear.weight)] > 1:
                # a tied lm_head shares its tensor with the input embedding; LoRA adapts only the head, so give the
                # head its own copy rather than silently changing the embedding too
                linear.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=linear.weight.requires_grad)
                untied = True
            delta_out_in = (weights.b[name].float() @ weights.a[name].float()) * weights.scale
            w = linear.weight
            w.copy_((w.float() + delta_out_in.to(w.device)).to(w.dtype))  # add in fp32, round once
    config = getattr(model, "config", None)
    if untied and config is not None and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False  # or save_pretrained/tie_weights would tie the merged head back


def checkpoint_size_bytes(path: Path) -> int:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"checkpoint {path.name!r} not found")
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    )


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    atomic_dir.fsync(path)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, path, metadata={"format": "pt"})  # "format": "pt" is what PEFT and transformers write
    atomic_dir.fsync(path)
