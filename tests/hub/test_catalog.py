"""Names to directories: what a client's base_model resolves to, and what the cache holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hub.conftest import FakeModel
from tinkerd.domain.errors import InvalidRequestError, ModelFetchError, NotFoundError
from tinkerd.hub import DEFAULT_MODEL, list_models, model_dir, resolve_model
from tinkerd.hub.layout import publish_dir


def test_default_model_not_pulled_says_how_to_pull(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="tinkerd models pull HuggingFaceTB/SmolLM2-135M-Instruct"):
        resolve_model(DEFAULT_MODEL, tmp_path)


def test_pulled_model_resolves_to_the_cache(tmp_path: Path, fake_model: FakeModel) -> None:
    path = fake_model(tmp_path, DEFAULT_MODEL)
    assert resolve_model(DEFAULT_MODEL, tmp_path).path == path


def test_model_placed_in_the_cache_by_hand_resolves(tmp_path: Path, fake_model: FakeModel) -> None:
    path = fake_model(tmp_path, "someone/my-model")
    resolved = resolve_model("someone/my-model", tmp_path)
    assert (resolved.name, resolved.path) == ("someone/my-model", path)


def test_local_directory_is_served_as_is_under_its_path_string(tmp_path: Path) -> None:
    local = tmp_path / "my tokenizer"
    local.mkdir()
    (local / "config.json").write_text("{}")
    resolved = resolve_model(str(local), tmp_path / "cache")
    assert resolved.name == str(local)
    assert resolved.path == local


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"without config\.json"):
        resolve_model(str(tmp_path), tmp_path / "cache")


def test_unknown_name_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=DEFAULT_MODEL):
        resolve_model("nobody/nothing", tmp_path)


def test_cached_model_wins_over_a_same_named_folder_in_the_working_directory(
    tmp_path: Path, fake_model: FakeModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cached = fake_model(cache, DEFAULT_MODEL)
    fake_model(tmp_path / "cwd", DEFAULT_MODEL)
    monkeypatch.chdir(tmp_path / "cwd" / "models")
    assert resolve_model(DEFAULT_MODEL, cache).path == cached


def test_model_ids_cannot_escape_the_cache(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError):
        model_dir(tmp_path, "../../etc")


def test_list_models_reports_name_size_and_architecture(tmp_path: Path, fake_model: FakeModel) -> None:
    assert list_models(tmp_path) == []
    fake_model(tmp_path, "b-org/model", "Qwen3ForCausalLM")
    fake_model(tmp_path, "a-org/model")
    # A pull in progress stages its directory beside the final one; it is not a model yet.
    fake_model(tmp_path, "a-org/.model.partial-x")
    listed = list_models(tmp_path)
    assert [(m.name, m.architecture) for m in listed] == [
        ("a-org/model", "LlamaForCausalLM"),
        ("b-org/model", "Qwen3ForCausalLM"),
    ]
    config_size = len(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    assert listed[0].size_bytes == 1000 + config_size


def test_publish_dir_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError), publish_dir(final) as staging:
        (staging / "half-written").write_text("x")
        raise RuntimeError("conversion failed")
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_publish_dir_keeps_the_first_of_two_racing_builds(tmp_path: Path) -> None:
    final = tmp_path / "m"
    with publish_dir(final) as first, publish_dir(final) as second:
        (first / "who").write_text("first")
        (second / "who").write_text("second")
    # The inner (second) block finished first, so its directory won; the other was discarded quietly.
    assert (final / "who").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
