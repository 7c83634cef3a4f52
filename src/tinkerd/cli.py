"""The `tinkerd` command line: the composition root that reads settings once and wires the layers.

Commands are grouped by what they act on, one Typer sub-app per group (`tinkerd models ...`, `tinkerd runs ...`,
`tinkerd checkpoints ...`); a new group gets its own sub-app registered on `app` the same way. Commands turn
tinkerd's domain errors into a one-line message and exit code 1; anything else is a bug and keeps its traceback.

`runs` and `checkpoints` read a data directory directly (the SQLite database and the checkpoint files), so they work
whether or not a server is running on it; they only read, except `export`, which writes where it is told.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tinkerd import __version__, hub
from tinkerd import cli_views as views
from tinkerd.domain.errors import NotFoundError, TinkerdError
from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.paths import parse_tinker_path
from tinkerd.domain.records import Checkpoint, TrainingRun
from tinkerd.settings import Settings, SettingsError

if TYPE_CHECKING:
    from tinkerd.store import Store

app = typer.Typer(
    name="tinkerd",
    help="A self-hosted server for the Tinker fine-tuning API.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Fetch and list the base models tinkerd serves.", no_args_is_help=True)
app.add_typer(models_app, name="models")
runs_app = typer.Typer(help="Training runs stored in a data directory (no server needed).", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
checkpoints_app = typer.Typer(
    help="Checkpoints stored in a data directory: list them, export them for PEFT or transformers.",
    no_args_is_help=True,
)
app.add_typer(checkpoints_app, name="checkpoints")

CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Where models are kept. Default: $TINKERD_CACHE_DIR, else the user cache dir.",
        file_okay=False,
        show_default=False,
    ),
]


DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The data directory `tinkerd serve` uses. Default: $TINKERD_DATA_DIR, else the user data dir.",
        file_okay=False,
        show_default=False,
    ),
]
OwnerOption = Annotated[
    str,
    typer.Option("--owner", help="Whose runs and checkpoints: the user id of a --keys file line (single user: local)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many, newest first.")]


def _fail(error: Exception) -> typer.Exit:
    message = Text("error: ", style="red")
    message.append(str(error))  # as text: a run id like s:train:0 is not an emoji code, [x] not markup
    views.console(stderr=True).print(message, soft_wrap=True)
    return typer.Exit(code=1)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tinkerd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """A self-hosted server for the Tinker fine-tuning API."""


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="Model id to fetch.", show_default=True)] = hub.DEFAULT_MODEL,
    cache_dir: CacheDirOption = None,
) -> None:
    """Download and convert a model once; later pulls of the same model return at once."""
    settings = Settings.load(cache_dir=cache_dir)
    try:
        result = hub.pull(name, settings.cache_dir, progress=True)
    except TinkerdError as error:
        raise _fail(error) from error
    verb = "Pulled" if result.fetched else "Already pulled:"
    typer.echo(f"{verb} {result.name} -> {result.path}")
    typer.echo(f"Tokenizer by repo id, offline: HF_HOME={result.hf_home} HF_HUB_OFFLINE=1")


@models_app.command("list")
def models_list(cache_dir: CacheDirOption = None) -> None:
    """Show the models in the cache."""
    settings = Settings.load(cache_dir=cache_dir)
    models = hub.list_models(settings.cache_dir)
    console = Console()
    if not models:
        console.print(f"No models in {settings.cache_dir}; run `tinkerd models pull`.", highlight=False)
        return
    # No path column: every path is <root>/<name>, and long paths would squeeze the names on narrow terminals.
    table = Table(title=f"Models in {hub.models_root(settings.cache_dir)}", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("architecture", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for model in models:
        table.add_row(model.name, model.architecture, views.human_size(model.size_bytes))
    console.print(table)


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on. \\[default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port to listen on. \\[default: 8000]")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Database and checkpoints. \\[default: the user data dir]", file_okay=False),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="A pulled model id or a local Hugging Face model directory; repeat to serve several. "
            f"\\[default: {hub.DEFAULT_MODEL}]",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Torch device. \\[default: cpu]")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="Training compute dtype of the base model. \\[default: bfloat16]")
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option("--keys", help="File of '<api-key> <user>' lines; unknown keys get 401. \\[default: single user]"),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Torch threads of the engine. \\[default: one per core]", min=1)
    ] = None,
    max_body_mb: Annotated[
        int | None, typer.Option("--max-body-mb", help="Largest request body in MiB; larger get 413. \\[default: 256]")
    ] = None,
    max_queued_per_user: Annotated[
        int | None,
        typer.Option(
            "--max-queued-per-user",
            help="Unfinished requests per user; more get 429 and the SDK retries later (0: no cap). \\[default: 1024]",
        ),
    ] = None,
    max_runs_per_user: Annotated[
        int | None,
        typer.Option(
            "--max-runs-per-user", help="Training runs in open sessions per user (0: no cap). \\[default: 64]"
        ),
    ] = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Serve the Tinker API (api + worker in one process) until Ctrl-C. Every option also reads TINKERD_<NAME>."""
    from tinkerd.server import serve as run_server  # loads FastAPI and torch: only for this command

    try:
        settings = Settings.load(
            cache_dir=cache_dir,
            data_dir=data_dir,
            host=host,
            port=port,
            models=model,
            device=device,
            dtype=dtype,
            keys_file=keys,
            threads=threads,
            max_body_mb=max_body_mb,
            max_queued_per_user=max_queued_per_user,
            max_runs_per_user=max_runs_per_user,
        )
        run_server(settings, announce=lambda line: typer.echo(line))
    except (TinkerdError, SettingsError) as error:
        raise _fail(error) from error


# -- runs and checkpoints ----------------------------------------------------------------------------------------------


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
        raise _fail(error) from error
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
        raise _fail(error) from error
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
        raise _fail(error) from error
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
            files = export_peft(source, out, overwrite=force)
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
        raise _fail(error) from error
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


def main() -> None:
    from tinkerd import cli_roles

    cli_roles.register(app)  # api, trainer, sampler, status: the split deployment's commands
    app()
