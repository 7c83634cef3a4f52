"""Options several `tinkerd` commands share: the settings' options (built from `Settings`' field metadata, so a
setting's flag, help and default are written once, in settings.py), whose data, and how to print it."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from tinkerd import settings as settings_module

R = TypeVar("R")


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in settings_module.fields() if f.name == name)


def setting_help(name: str) -> str:
    """The option's help: what it sets, its variable and its default (rich markup: `\\[` is a literal bracket)."""
    field = _field(name)
    spec = settings_module.meta(field)
    return f"{spec.help} Also ${settings_module.variable_of(field)}. \\[default: {spec.shown_default}]"


def setting_annotation(name: str) -> Any:
    """`Annotated[<type> | None, typer.Option(...)]` for one setting; None means "not given" to `Settings.load`."""
    field = _field(name)
    kind = settings_module.value_type(field)
    python_type: Any = list[str] if kind is tuple else kind
    extra: dict[str, Any] = {"file_okay": False} if settings_module.meta(field).is_dir else {}
    if kind is tuple:
        extra["metavar"] = "<str>"  # repeatable; typer would show <list[str]>
    option = typer.Option(settings_module.flag_of(field), help=setting_help(name), show_default=False, **extra)
    return Annotated[python_type | None, option]


def settings_options(*names: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command one option per named setting (all of them if none are named), after its own parameters.

    The command declares a `given: dict[str, Any]` parameter instead; it receives the options' values by field
    name, ready for `Settings.load(**given)`.
    """

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        chosen = names or tuple(f.name for f in settings_module.fields())
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "given"]
        added = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=setting_annotation(n))
            for n in chosen
        ]

        @functools.wraps(command)
        def with_settings(**kwargs: Any) -> R:
            given = {n: kwargs.pop(n) for n in chosen}
            return command(**kwargs, given=given)

        parameters = own + added
        with_settings.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        with_settings.__annotations__ = {p.name: p.annotation for p in parameters}
        return with_settings

    return decorate


def _dir_option(name: str) -> Any:
    return typer.Option(
        settings_module.flag_of(_field(name)), help=setting_help(name), file_okay=False, show_default=False
    )


# The two settings other commands than `serve` read, as static types (a type checker cannot see through the above).
CacheDirOption = Annotated[Path | None, _dir_option("cache_dir")]
DataDirOption = Annotated[Path | None, _dir_option("data_dir")]
OwnerOption = Annotated[
    str,
    typer.Option("--owner", help="Whose runs and checkpoints: the user id of a --keys file line (single user: local)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many, newest first.")]
