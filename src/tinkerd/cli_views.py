"""How the CLI shows records: rich tables for a terminal, plain JSON for scripts.

User-chosen strings (run ids, names, metadata) are shown as text, never as rich markup or emoji codes: a run id
like `s:train:0` must not turn into an emoji, nor `[red]` in a name into a colour.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import PurePath
from typing import Any

import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from tinkerd.domain.records import Checkpoint, TrainingRun


def console(*, stderr: bool = False) -> Console:
    return Console(stderr=stderr, emoji=False, highlight=False)


def fail(error: Exception) -> typer.Exit:
    """Print a one-line error and return the exit (code 1) for the command to raise."""
    message = Text("error: ", style="red")
    message.append(str(error))  # as text: a run id like s:train:0 is not an emoji code, [x] not markup
    console(stderr=True).print(message, soft_wrap=True)
    return typer.Exit(code=1)


def human_size(size_bytes: int) -> str:
    size = float(size_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def when(moment: datetime | None) -> str:
    """Local time to the minute: what a person scanning a table needs (JSON output keeps the exact UTC time)."""
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M")


def as_json(value: object) -> Any:
    """Records as plain JSON values: dataclasses as objects (checkpoints with their tinker_path), times in ISO 8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Checkpoint):
            fields["tinker_path"] = value.tinker_path
        return fields
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


def to_json_text(value: object) -> str:
    return json.dumps(as_json(value), indent=2)


def more_note(shown: int, total: int) -> str | None:
    return f"showing the newest {shown} of {total}; use --limit to see more" if total > shown else None


def runs_table(runs: Sequence[TrainingRun], checkpoint_counts: dict[str, int], title: str, total: int) -> Table:
    table = Table(title=Text(title), title_justify="left", caption=more_note(len(runs), total))
    table.add_column("run", overflow="fold")
    table.add_column("base model", overflow="fold")
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("ckpts", justify="right", no_wrap=True)
    table.add_column("last request", no_wrap=True)  # what tells runs in progress from old ones
    for run in runs:
        name = Text(run.id)
        if run.corrupted:
            name.append(" (corrupted)", style="red")
        count = str(checkpoint_counts.get(run.id, 0))
        table.add_row(name, Text(_short_model(run.base_model)), str(run.lora.rank), count, when(run.last_request_at))
    return table


def _short_model(name: str) -> str:
    """A model served from a local directory by its folder name (`runs show` and JSON give the whole path)."""
    path = PurePath(name)
    return path.name if path.is_absolute() and path.name else name


def run_facts(run: TrainingRun) -> Table:
    lora = run.lora
    parts = (("attention", lora.train_attn), ("MLP", lora.train_mlp), ("unembedding", lora.train_unembed))
    state = Text("corrupted: a failed optimizer step left it half-updated", style="red") if run.corrupted else "ok"
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("run", Text(run.id)),
        ("session", Text(run.session_id)),
        ("owner", Text(run.owner)),
        ("base model", Text(run.base_model)),
        ("LoRA", f"rank {lora.rank}, alpha {lora.alpha:g}, seed {lora.seed if lora.seed is not None else '-'}"),
        ("trains", ", ".join(part for part, on in parts if on)),
        ("created", when(run.created_at)),
        ("last request", when(run.last_request_at)),
        ("state", state),
        ("metadata", Text(json.dumps(run.user_metadata)) if run.user_metadata else "-"),
    ]
    for key, value in rows:
        facts.add_row(key, value)
    return facts


def checkpoints_table(checkpoints: Iterable[Checkpoint], title: str, caption: str | None = None) -> Table:
    """One table of checkpoints named by `weights/<name>`; the run is the title (ids are too long for a column)."""
    items = list(checkpoints)
    table = Table(title=Text(title), title_justify="left", caption=caption)
    table.add_column("checkpoint", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("saved", no_wrap=True)
    if any(c.expires_at is not None for c in items):
        table.add_column("expires", no_wrap=True)
    table.add_column("public", no_wrap=True)
    for c in items:
        size = "-" if c.size_bytes is None else human_size(c.size_bytes)
        expiry = [when(c.expires_at)] if len(table.columns) == 5 else []
        table.add_row(Text(c.path.checkpoint_id), size, when(c.created_at), *expiry, "yes" if c.public else "no")
    return table


def checkpoints_by_run(checkpoints: Sequence[Checkpoint], caption: str | None) -> RenderableType:
    """A table per run, runs in the order of their newest checkpoint; tinker paths are `tinker://<run>/<checkpoint>`."""
    by_run: dict[str, list[Checkpoint]] = {}
    for c in checkpoints:
        by_run.setdefault(c.run_id, []).append(c)
    tables: list[RenderableType] = [checkpoints_table(items, f"tinker://{run_id}/") for run_id, items in by_run.items()]
    if caption:
        tables.append(Text(caption, style="italic"))
    return Group(*tables)
