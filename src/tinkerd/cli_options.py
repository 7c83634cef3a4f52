"""Options several `tinkerd` commands share: where the cache and the data are, whose data, how to print it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
