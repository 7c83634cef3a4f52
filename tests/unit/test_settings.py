"""Each setting is written once, in `Settings`' field metadata: its variable, its `serve` option and the README's
Settings table must all agree with it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from scripts import settings_table
from tinkerd.cli import app
from tinkerd.cli_options import settings_options
from tinkerd.settings import Settings, SettingsError, fields, flag_of, meta, value_type, variable_of

FIELDS = [f.name for f in fields()]


def _sample(field: dataclasses.Field[Any], tmp_path: Path) -> tuple[list[str], str, Any]:
    """A value for the setting other than its default: as command-line words, as a variable, and as loaded."""
    kind = value_type(field)
    if kind is int:
        value = (meta(field).minimum or 0) + 3
        return [str(value)], str(value), value
    if kind is tuple:
        return ["a/b", "c"], "a/b, c", ("a/b", "c")
    if kind is Path:
        path = tmp_path / field.name
        return [str(path)], str(path), path
    choices = [c for c in meta(field).choices if c != field.default]
    if choices:  # a setting with a fixed set of values takes another of them
        return [choices[0]], choices[0], choices[0]
    return [f"{field.name}-x"], f"{field.name}-x", f"{field.name}-x"


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in fields() if f.name == name)


@pytest.mark.parametrize("name", FIELDS)
def test_every_setting_is_read_from_its_variable(name: str, tmp_path: Path) -> None:
    field = _field(name)
    _, raw, expected = _sample(field, tmp_path)
    loaded = getattr(Settings.load({variable_of(field): raw}), name)
    assert loaded == expected != getattr(Settings.load({}), name)


@pytest.mark.parametrize("name", FIELDS)
def test_every_setting_is_an_option_that_wins_over_its_variable(name: str, tmp_path: Path) -> None:
    field = _field(name)
    words, raw, expected = _sample(field, tmp_path)
    seen: list[Settings] = []
    probe = typer.Typer()

    @probe.command()
    @settings_options()
    def command(given: dict[str, Any]) -> None:
        seen.append(Settings.load({variable_of(field): raw + "-from-the-variable"}, **given))

    args = [part for word in words for part in (flag_of(field), word)]
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 0, result.output
    assert getattr(seen[0], name) == expected


def test_serve_has_exactly_one_option_per_setting_with_its_help() -> None:
    serve = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    options = {p.opts[0]: p for p in serve.params if p.param_type_name == "option" and p.opts[0] != "--help"}
    assert sorted(options) == sorted(flag_of(f) for f in fields())
    for field in fields():
        help_text = options[flag_of(field)].help or ""
        assert meta(field).help in help_text and variable_of(field) in help_text
        assert meta(field).shown_default in help_text


def test_the_readme_table_is_the_one_the_settings_make() -> None:
    text = settings_table.README.read_text()
    assert settings_table.with_table(text) == text, "README.md is stale: run `python -m scripts.settings_table`"
    for field in fields():
        assert f"| `{flag_of(field)}` | `{variable_of(field)}` |" in text


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown settings: colour"):
        Settings.load({}, colour="red")


def test_the_image_root_must_be_a_directory_and_is_resolved(tmp_path: Path) -> None:
    assert Settings.load({}, cache_dir=tmp_path).resolved_image_root is None  # pointers read no files
    (tmp_path / "images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "images", target_is_directory=True)
    settings = Settings.load({"TINKERD_IMAGE_ROOT": str(tmp_path / "link")}, cache_dir=tmp_path)
    assert settings.resolved_image_root == (tmp_path / "images").resolve()
    with pytest.raises(SettingsError, match=r"image_root '.*missing' is not a directory"):
        _ = Settings.load({}, cache_dir=tmp_path, image_root=tmp_path / "missing").resolved_image_root
