"""The `tinkerd` command line: the composition root that reads settings once and wires the layers.

Commands are grouped by what they act on, one Typer sub-app per group (`tinkerd models ...` here; `tinkerd runs ...`
and `tinkerd checkpoints ...` in `cli_runs`); a new group gets its own sub-app registered on `app` the same way.
Commands turn tinkerd's domain errors into a one-line message and exit code 1 (`cli_views.fail`); anything else is a
bug and keeps its traceback. Options several commands share are in `cli_options`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tinkerd import __version__, cli_metrics, hub
from tinkerd import cli_views as views
from tinkerd.cli_options import CacheDirOption, settings_options
from tinkerd.cli_runs import checkpoints_app, runs_app
from tinkerd.domain.errors import TinkerdError
from tinkerd.settings import Settings, SettingsError

app = typer.Typer(
    name="tinkerd",
    help="A self-hosted server for the Tinker fine-tuning API.",
    no_args_is_help=True,
    add_completion=False,
)
models_app = typer.Typer(help="Fetch and list the base models tinkerd serves.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(checkpoints_app, name="checkpoints")


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
        raise views.fail(error) from error
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
    table.add_column("engine path", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    for model in models:
        table.add_row(model.name, model.architecture, model.engine_path, views.human_size(model.size_bytes))
    console.print(table)


@app.command("serve")
@settings_options()
def serve(given: dict[str, Any]) -> None:
    """Serve the Tinker API (api + worker in one process) until Ctrl-C. Every option also reads TINKERD_<NAME>."""
    from tinkerd.server import serve as run_server  # loads FastAPI and torch: only for this command

    try:
        settings = Settings.load(**given)
        run_server(settings, announce=lambda line: typer.echo(line))
    except (TinkerdError, SettingsError) as error:
        raise views.fail(error) from error


runs_app.command("metrics")(cli_metrics.runs_metrics)


def main() -> None:
    from tinkerd import cli_roles

    cli_roles.register(app)  # api, trainer, sampler, status: the split deployment's commands
    app()
