"""`tinkerd serve` as an operator runs it: settings from the environment, a keys file, the startup banner, and a
clean exit on SIGTERM."""

from __future__ import annotations

from pathlib import Path

import pytest
import tinker

from tests.e2e.conftest import free_port, start_server, stop_server

pytestmark = pytest.mark.e2e


def test_keys_env_settings_banner_and_sigterm(tmp_path: Path, tiny_model_dir: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("tml-alice alice\ntml-bob bob\n")
    port = free_port()
    server = start_server(tmp_path, tiny_model_dir, env={"TINKERD_PORT": str(port), "TINKERD_KEYS": str(keys)})
    try:
        banner = server.log.read_text()
        assert f"listening on http://127.0.0.1:{port}" in banner
        assert f"serving {tiny_model_dir}" in banner and f"keys from {keys}" in banner

        with pytest.raises(tinker.AuthenticationError):
            tinker.RestClient(base_url=server.url, api_key="tml-mallory").get_server_capabilities().result()

        alice = tinker.ServiceClient(base_url=server.url, api_key="tml-alice")
        training = alice.create_lora_training_client(base_model=server.model, rank=4).result()
        run = tinker.RestClient(base_url=server.url, api_key="tml-alice").get_training_run(training.model_id).result()
        assert run.model_owner == "alice"
        bob = tinker.RestClient(base_url=server.url, api_key="tml-bob")
        with pytest.raises(tinker.NotFoundError):
            bob.get_training_run(training.model_id).result()
        assert bob.list_training_runs().result().training_runs == []
        alice.close("success").result()
    finally:
        code = stop_server(server.process)
    assert code == 0, server.log.read_text()
    assert "tinkerd: stopping" in server.log.read_text()


def test_running_in_process(tiny_model_dir: Path) -> None:
    import tinkerd

    with tinkerd.running(model=str(tiny_model_dir)) as url:
        assert url.startswith("http://127.0.0.1:")
        capabilities = tinker.RestClient(base_url=url, api_key="tml-x").get_server_capabilities().result()
        assert [m.model_name for m in capabilities.supported_models] == [str(tiny_model_dir)]
        service = tinker.ServiceClient(base_url=url, api_key="tml-x")
        training = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4).result()
        assert training.get_info().model_id == training.model_id
        service.close("success").result()


def test_settings_precedence_for_serve(tmp_path: Path) -> None:
    from tinkerd.settings import Settings, SettingsError

    env = {
        "TINKERD_PORT": "9001",
        "TINKERD_MODEL": "a/b, /models/c",
        "TINKERD_HOST": "0.0.0.0",
        "TINKERD_DTYPE": "fp32",
    }
    from_env = Settings.load(env)
    assert (from_env.port, from_env.models, from_env.host, from_env.dtype) == (
        9001,
        ("a/b", "/models/c"),
        "0.0.0.0",
        "fp32",
    )
    from_args = Settings.load(env, port=9002, models=["x/y"], data_dir=tmp_path, keys_file=tmp_path / "keys")
    assert (from_args.port, from_args.models, from_args.data_dir) == (9002, ("x/y",), tmp_path)
    assert from_args.keys_file == tmp_path / "keys"
    defaults = Settings.load({})
    assert (defaults.port, defaults.host, defaults.models, defaults.keys_file) == (8000, "127.0.0.1", (), None)
    with pytest.raises(SettingsError):
        Settings.load({"TINKERD_PORT": "eighty"})


def test_model_info_reads_the_facts_the_api_needs(tmp_path: Path) -> None:
    import json

    from tinkerd.hub import ResolvedModel
    from tinkerd.server import model_info

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "max_position_embeddings": 40960})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    info = model_info(ResolvedModel(name=str(tmp_path), path=tmp_path))
    assert (info.arch, info.vocab_size, info.max_context_length) == ("Qwen3ForCausalLM", 151936, 40960)
    assert info.eos_token_ids == (151645, 151643)
    assert info.tokenizer_id is None  # no tokenizer files: the SDK falls back to the model name
    (tmp_path / "tokenizer.json").write_text("{}")
    assert model_info(ResolvedModel(name=str(tmp_path), path=tmp_path)).tokenizer_id == str(tmp_path)
    assert model_info(ResolvedModel(name="org/name", path=tmp_path)).tokenizer_id == "org/name"
