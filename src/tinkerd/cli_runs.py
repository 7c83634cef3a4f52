"""The `tinkerd runs` and `tinkerd checkpoints` commands: what a data directory holds, read without a server.

They read the SQLite database and the checkpoint files directly, so they work whether or not a server is running on
the directory; they only read, except `checkpoints export`, which writes where it is told.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tinkerd import cli_views as views
from tinkerd import hub
from tinkerd.cli_options import CacheDirOption, DataDirOption, JsonOption, LimitOption, OwnerOption
from tinkerd.domain.errors import NotFoundError, TinkerdError
from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.paths import parse_tinker_path
from tinkerd.domain.records import Checkpoint, TrainingRun
from tinkerd.settings import Settings, SettingsError

if TYPE_CHECKING:
    from tinkerd.store import Store

runs_app = typer.Typer(help="Training runs stored in a data directory (no server needed).", no_args_is_help=True)
checkpoints_app = typer.Typer(
    help="Checkpoints stored in a data directory: list them, export them for PEFT or transformers.",
    no_args_is_help=True,
)


class ExportFormat(StrEnum):
    peft = "peft"
    merged = "merged"


class MergedDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@contextmanager
def _open_store(data_dir: Path | None) -> Iterator[tuple[Path, Store | None]]:
    """The data directory and its store, or None when no server has written one there yet (nothing is created)."""
    from tinkerd.store import Store, default_url  # SQLAlchemy: only for the commands that read the database

    directory = Settings.load(data_dir=data_dir).resolved_data_dir
    if not (directory / "tinkerd.db").is_file():
        yield directory, None
        return
    store = Store.open(default_url(directory))
    try:
        yield directory, store
    finally:
        store.close()


def _no_data(directory: Path) -> NotFoundError:
    return NotFoundError(f"no tinkerd data in {directory} (give --data-dir or set TINKERD_DATA_DIR)")


@runs_app.command("list")
def runs_list(
    data_dir: DataDirOption = None,
    owner: OwnerOption = DEFAULT_OWNER,
    limit: LimitOption = 100,
    json_output: JsonOption = False,
) -> None:
    """List training runs, newest first."""
    runs: tuple[TrainingRun, ...] = ()
    total, counts = 0, {}
    try:
        with _open_store(data_dir) as (directory, store):
            if store is not None:
                page = store.runs.list_for_owner(owner, limit=limit)
                runs, total = page.items, page.total_count
                counts = {r.id: store.checkpoints.list_for_run(r.id, owner, limit=1).total_count for r in runs}
    except TinkerdError as error:  # a database of another schema version, or one locked for long
        raise views.fail(error) from error
    if json_output:
        items = [views.as_json(r) | {"checkpoint_count": counts[r.id]} for r in runs]
        typer.echo(views.to_json_text({"runs": items, "total_count": total}))
    elif not runs:
        views.console().print(f"No training runs of {owner!r} in {directory}.", markup=False)
    else:
        views.console().print(views.runs_table(runs, counts, f"Training runs in {directory}", total))


@runs_app.command("show")
def runs_show(
    run_id: Annotated[str, typer.Argument(help="The run's id, e.g. <session>:train:0.")],
    data_dir: DataDirOption = None,
    owner: OwnerOption = DEFAULT_OWNER,
    json_output: JsonOption = False,
) -> None:
    """Show one training run: its LoRA settings, metadata and checkpoints."""
    try:
        with _open_store(data_dir) as (directory, store):
            if store is None:
                raise _no_data(directory)
            run = store.runs.get(run_id, owner)
            checkpoints = store.checkpoints.list_for_run(run_id, owner, limit=1000)
    except TinkerdError as error:
        raise views.fail(error) from error
    if json_output:
        shown = {"run": run, "checkpoints": checkpoints.items, "checkpoint_count": checkpoints.total_count}
        typer.echo(views.to_json_text(shown))
        return
    console = views.console()
    console.print(views.run_facts(run))
    if checkpoints.items:
        caption = views.more_note(len(checkpoints.items), checkpoints.total_count)
        console.print(views.checkpoints_table(checkpoints.items, f"Checkpoints (tinker://{run.id}/...)", caption))
    else:
        console.print("No checkpoints.")


@checkpoints_app.command("list")
def checkpoints_list(
    run: Annotated[str | None, typer.Option("--run", help="Only this run's checkpoints.")] = None,
    data_dir: DataDirOption = None,
    owner: OwnerOption = DEFAULT_OWNER,
    limit: LimitOption = 100,
    json_output: JsonOption = False,
) -> None:
    """List checkpoints, newest first, grouped by run; a checkpoint's path is tinker://<run>/<checkpoint>."""
    items: tuple[Checkpoint, ...] = ()
    total = 0
    try:
        with _open_store(data_dir) as (directory, store):
            if store is None and run is not None:
                raise _no_data(directory)
            if store is not None:
                page = (
                    store.checkpoints.list_for_run(run, owner, limit=limit)
                    if run is not None
                    else store.checkpoints.list_for_owner(owner, limit=limit)
                )
                items, total = page.items, page.total_count
    except TinkerdError as error:
        raise views.fail(error) from error
    if json_output:
        typer.echo(views.to_json_text({"checkpoints": items, "total_count": total}))
    elif not items:
        views.console().print(f"No checkpoints of {owner!r} in {directory}.", markup=False)
    else:
        views.console().print(views.checkpoints_by_run(items, views.more_note(len(items), total)))


@checkpoints_app.command("export")
def checkpoints_export(
    path: Annotated[str, typer.Argument(help="The checkpoint's tinker:// path (see `tinkerd checkpoints list`).")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write; must be new or empty (or use --force).")],
    export_format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="peft: a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors). "
            "merged: a full Hugging Face model with the adapter merged into the base weights, plus its tokenizer.",
        ),
    ] = ExportFormat.peft,
    base_model: Annotated[
        str | None,
        typer.Option("--base-model", help="For merged: the base model (id or directory). Default: the run's."),
    ] = None,
    dtype: Annotated[MergedDtype, typer.Option("--dtype", help="For merged: weight dtype to write.")] = (
        MergedDtype.float32
    ),
    force: Annotated[bool, typer.Option("--force", help="Replace what is in --out.")] = False,
    data_dir: DataDirOption = None,
    owner: OwnerOption = DEFAULT_OWNER,
    cache_dir: CacheDirOption = None,
    json_output: JsonOption = False,
) -> None:
    """Export a checkpoint (weights/ or sampler_weights/) as a PEFT adapter or a merged model for `from_pretrained`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tinkerd.engine.export import MERGED_DTYPES, export_merged, export_peft  # torch: only for this command
    from tinkerd.store.files import CheckpointFiles

    try:
        tinker_path = parse_tinker_path(path)
        with _open_store(data_dir) as (directory, store):
            if store is None:
                raise _no_data(directory)
            store.checkpoints.get(tinker_path, owner)  # NotFoundError unless the owner may read it
            base_name = base_model or store.runs.get(tinker_path.run_id, owner, accessible=True).base_model
        source = CheckpointFiles(directory).dir_of(tinker_path)
        if export_format is ExportFormat.peft:
            files = export_peft(source, out, overwrite=force, base_model_type=_model_type(base_name, cache_dir))
        else:
            base_dir = hub.resolve_model(base_name, Settings.load(cache_dir=cache_dir).cache_dir).path
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # ours shows the whole export; theirs would interleave with it
            columns = (
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=views.console(stderr=True), disable=json_output) as progress:
                task = progress.add_task("merging", total=None)

                def report(what: str, done: int, total: int) -> None:
                    progress.update(task, description=what, completed=done, total=total)

                files = export_merged(
                    source, base_dir, out, dtype=MERGED_DTYPES[dtype.value], overwrite=force, progress=report
                )
    except (TinkerdError, SettingsError, OSError) as error:
        raise views.fail(error) from error
    size = sum(f.stat().st_size for f in files)
    if json_output:
        names = [f.name for f in files]
        done = {"path": str(tinker_path), "format": export_format.value, "out": str(out.absolute()), "files": names}
        typer.echo(views.to_json_text(done | {"size_bytes": size}))
        return
    loader = "AutoModelForCausalLM.from_pretrained(DIR)" if export_format is ExportFormat.merged else "PeftModel"
    typer.echo(
        f"Exported {tinker_path} as {export_format.value} to {out} ({len(files)} files, {views.human_size(size)})"
    )
    typer.echo(f"Load it with {loader}" + (".from_pretrained(base_model, DIR)" if loader == "PeftModel" else ""))


def _model_type(base_model: str, cache_dir: Path | None) -> str | None:
    """The ``model_type`` in a base model's config.json, when the model is here to read (None otherwise)."""
    import json

    try:
        path = hub.resolve_model(base_model, Settings.load(cache_dir=cache_dir).cache_dir).path / "config.json"
        config = json.loads(path.read_text())
    except (TinkerdError, SettingsError, OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None
