"""Lay a converted model's small files out as a Hugging Face hub cache entry under its real repo id.

The official SDK and the cookbook load tokenizers themselves with `AutoTokenizer.from_pretrained(repo_id)`.
With `HF_HOME=<cache>/hf` and `HF_HUB_OFFLINE=1` that call finds this entry and never touches the network.
Only config and tokenizer files go in (transformers 5 wants config.json to pick the tokenizer class); the weights
stay in the model directory, which is what tinkerd serves.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tinkerd.hub.layout import hub_repo_dir, publish_dir

HUB_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def _present_files(model_dir: Path) -> list[Path]:
    return [model_dir / name for name in HUB_FILES if (model_dir / name).is_file()]


def snapshot_revision(model_dir: Path) -> str:
    """A 40-hex revision derived from the files' contents, so the same conversion always gets the same id.

    It is not the commit on huggingface.co (we never see that repo); it only has to look like one.
    """
    digest = hashlib.sha1()
    for path in _present_files(model_dir):
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def hub_snapshot_dir(cache_dir: Path, repo_id: str) -> Path | None:
    """The snapshot that refs/main points at, if the entry is complete."""
    repo_dir = hub_repo_dir(cache_dir, repo_id)
    try:
        revision = (repo_dir / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo_dir / "snapshots" / revision
    return snapshot if (snapshot / "config.json").is_file() else None


def write_hub_entry(model_dir: Path, cache_dir: Path, repo_id: str) -> Path:
    """Create (or replace) the hub cache entry for `repo_id` from `model_dir`; return the snapshot directory."""
    revision = snapshot_revision(model_dir)
    repo_dir = hub_repo_dir(cache_dir, repo_id)
    current = hub_snapshot_dir(cache_dir, repo_id)
    if current is not None and current.name == revision:
        return current
    if repo_dir.exists():
        # Stale or half-written by an older tinkerd: the model directory is the source of truth.
        shutil.rmtree(repo_dir)
    with publish_dir(repo_dir) as staging:
        snapshot = staging / "snapshots" / revision
        snapshot.mkdir(parents=True)
        for path in _present_files(model_dir):
            shutil.copy2(path, snapshot / path.name)
        (staging / "refs").mkdir()
        # huggingface_hub reads this file verbatim, without stripping: no trailing newline.
        (staging / "refs" / "main").write_text(revision)
    return repo_dir / "snapshots" / revision
