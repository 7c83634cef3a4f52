"""`tinkerd models ...` as a user runs it, and the settings it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.hub.conftest import FakeModel
from tinkerd.cli import app
from tinkerd.hub import DEFAULT_MODEL, PullResult
from tinkerd.settings import Settings, SettingsError, default_cache_dir

runner = CliRunner()


def test_models_list_shows_a_table_of_pulled_models(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model(tmp_path, DEFAULT_MODEL)
    fake_model(tmp_path, "someone/other", "Qwen3ForCausalLM")
    # a terminal wide enough for the four columns (name, architecture, engine path, size): rich truncates to fit
    result = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert DEFAULT_MODEL in result.output
    assert "someone/other" in result.output
    assert "Qwen3ForCausalLM" in result.output
    assert "1.1 KB" in result.output


def test_models_list_reads_the_cache_dir_from_the_environment(tmp_path: Path, fake_model: FakeModel) -> None:
    fake_model(tmp_path, "someone/other")
    result = runner.invoke(app, ["models", "list"], env={"TINKERD_CACHE_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "someone/other" in result.output


def test_models_list_on_an_empty_cache_says_how_to_pull(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "list", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert "tinkerd models pull" in result.output


def test_pulling_an_unknown_model_fails_with_a_message(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "pull", "nobody/nothing", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "nobody/nothing" in result.stderr
    assert DEFAULT_MODEL in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.weights
def test_pull_of_a_pulled_model_returns_at_once(pulled: PullResult, pulled_cache_dir: Path) -> None:
    result = runner.invoke(app, ["models", "pull", "--cache-dir", str(pulled_cache_dir)])
    assert result.exit_code == 0, result.output
    assert "Already pulled" in result.stdout
    assert str(pulled.path) in result.stdout


def test_settings_precedence_argument_then_environment_then_default(tmp_path: Path) -> None:
    env = {"TINKERD_CACHE_DIR": str(tmp_path / "env")}
    assert Settings.load(env, cache_dir=tmp_path / "arg").cache_dir == tmp_path / "arg"
    assert Settings.load(env).cache_dir == tmp_path / "env"
    assert Settings.load({}).cache_dir == default_cache_dir()


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    with pytest.raises(AttributeError):
        settings.cache_dir = Path("/elsewhere")  # type: ignore[misc]


def test_numeric_settings_from_the_environment_are_checked() -> None:
    assert Settings.load({"TINKERD_PORT": "0", "TINKERD_THREADS": "3"}).port == 0
    assert Settings.load({"TINKERD_THREADS": "3"}).threads == 3
    assert Settings.load({}).threads is None
    assert Settings.load({"TINKERD_THREADS": "3"}, threads=1).threads == 1
    with pytest.raises(SettingsError, match="TINKERD_THREADS must be a whole number"):
        Settings.load({"TINKERD_THREADS": "many"})
    with pytest.raises(SettingsError, match="at least 1"):
        Settings.load({"TINKERD_THREADS": "0"})
    with pytest.raises(SettingsError, match="TINKERD_PORT must be a whole number"):
        Settings.load({"TINKERD_PORT": "http"})
