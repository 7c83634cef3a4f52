"""`tinkerd runs metrics RUN [--plot out.png] [--csv]`: a run's step metrics for people without a browser.

Reads the data directory directly, like the other `runs` commands, or a split deployment's ledger
(``--database-url``). ``--plot`` needs matplotlib, which is the
optional ``plot`` extra (``pip install 'tinkerd[plot]'``): the server never needs it, and it is large.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from tinkerd import cli_views as views
from tinkerd.domain import curves
from tinkerd.domain.errors import NotFoundError, TinkerdError
from tinkerd.domain.ids import DEFAULT_OWNER
from tinkerd.domain.records import StepMetrics
from tinkerd.settings import Settings

# The curves drawn by --plot, in this order, when a run has them.
PLOTTED = ("loss_per_token", "learning_rate", "grad_norm", "sampler_logprob_abs_diff:mean")


def runs_metrics(
    run_id: Annotated[str, typer.Argument(help="The run's id, e.g. <session>:train:0.")],
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw the curves into this PNG (needs the 'plot' extra).")
    ] = None,
    csv_output: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="The server's data directory.", file_okay=False)
    ] = None,
    owner: Annotated[str, typer.Option("--owner", help="Whose run (single user: local).")] = DEFAULT_OWNER,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="A split deployment's ledger instead of a data directory. Env: TINKERD_DATABASE_URL.",
        ),
    ] = None,
) -> None:
    """Print a run's step metrics (loss per token, learning rate, gradient norm, ...) or plot them to a PNG."""
    if database_url is None and data_dir is None:
        database_url = os.environ.get("TINKERD_DATABASE_URL") or None
    try:
        rows = _read_ledger(run_id, database_url, owner) if database_url else _read(run_id, data_dir, owner)
    except TinkerdError as error:
        views.console(stderr=True).print(f"Error: {error}", markup=False)
        raise typer.Exit(code=1) from error
    if plot is not None:
        try:
            draw(rows, plot, title=run_id)
        except ImportError as error:
            views.console(stderr=True).print(
                "Error: --plot needs matplotlib: pip install 'tinkerd[plot]'", markup=False
            )
            raise typer.Exit(code=1) from error
        typer.echo(f"Wrote {len(rows)} rows of {run_id} to {plot}")
    elif csv_output:
        typer.echo(curves.to_csv(rows), nl=False)
    elif not rows:
        views.console().print(f"No metrics recorded for {run_id} yet.", markup=False)
    else:
        views.console().print(table(rows, run_id))


def _read_ledger(run_id: str, database_url: str, owner: str) -> list[StepMetrics]:
    from tinkerd.roles.settings import open_ledger  # SQLAlchemy: only when the database is read

    store = open_ledger(database_url)
    try:
        run = store.runs.get(run_id, owner)
        return store.metrics.for_run(run.id, owner)
    finally:
        store.close()


def _read(run_id: str, data_dir: Path | None, owner: str) -> list[StepMetrics]:
    from tinkerd.store import Store, default_url  # SQLAlchemy: only when the database is read

    directory = Settings.load(data_dir=data_dir).resolved_data_dir
    if not (directory / "tinkerd.db").is_file():
        raise NotFoundError(f"no tinkerd data in {directory} (give --data-dir or set TINKERD_DATA_DIR)")
    store = Store.open(default_url(directory))
    try:
        run = store.runs.get(run_id, owner)
        return store.metrics.for_run(run.id, owner)
    finally:
        store.close()


def table(rows: Sequence[StepMetrics], run_id: str) -> Table:
    names = curves.metric_names(rows)
    out = Table(title=Text(f"Metrics of {run_id}"))
    for column in ("step", "kind", "loss/token", *names):
        out.add_column(Text(column), justify="left" if column == "kind" else "right")
    for row in rows:
        per_token = curves.loss_per_token(row)
        cells = [str(row.step), row.kind.value, "" if per_token is None else f"{per_token:.4g}"]
        cells += ["" if name not in row.metrics else f"{row.metrics[name]:.4g}" for name in names]
        out.add_row(*(Text(cell) for cell in cells))
    return out


def series(rows: Sequence[StepMetrics], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one curve; loss_per_token is derived, every other name is a metric."""
    steps: list[int] = []
    values: list[float] = []
    for row in rows:
        value = curves.loss_per_token(row) if name == "loss_per_token" else row.metrics.get(name)
        if value is not None:
            steps.append(row.step)
            values.append(value)
    return steps, values


def draw(rows: Sequence[StepMetrics], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    names = [name for name in PLOTTED if series(rows, name)[0]] or ["loss_per_token"]
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.4 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        steps, values = series(rows, name)
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
