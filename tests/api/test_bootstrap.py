"""Client bootstrap and cross-cutting behaviour: config, capabilities, telemetry, error bodies, auth, body encodings."""

from __future__ import annotations

from pathlib import Path

import pytest
import zstandard

from tests.api.conftest import MODEL, PROTOBUF, Api, MakeApi, fwdbwd_proto
from tinkerd.api import load_keys_file
from tinkerd.domain.errors import InvalidRequestError


def test_client_config_answers_flags_the_sdk_reads(api: Api) -> None:
    config = api.ok("client/config", {"sdk_version": "0.38.0"})
    assert config["pjwt_auth_enabled"] is False
    assert config["parallel_fwdbwd_chunks"] is True
    assert config["proto_compress_fwdbwd"] is False
    assert config["use_pyqwest_transport"] is False  # the SDK's httpx transport: faster on loopback (bench/RESULTS.md)
    assert api.ok("client/dynamic_config", {"sdk_version": "0.38.0"})["refresh_interval_sec"] > 0


def test_client_config_overrides_come_from_settings(make_api: MakeApi) -> None:
    api = make_api(client_config_overrides={"proto_compress_fwdbwd": True})
    assert api.ok("client/config", {})["proto_compress_fwdbwd"] is True


def test_capabilities_list_served_models(api: Api) -> None:
    response = api.get("get_server_capabilities")
    assert response.status_code == 200
    assert response.json() == {
        "supported_models": [
            {
                "model_name": MODEL,
                "max_context_length": 64,
                "trainable": True,
                "sampleable": True,
                "engine_path": "packed",
            }
        ]
    }


def test_telemetry_is_accepted_and_dropped(api: Api) -> None:
    body = {"events": [{"event": "SESSION_START"}], "platform": "Linux", "sdk_version": "0.38.0", "session_id": "x"}
    assert api.ok("telemetry", body) == {"status": "accepted"}


def test_healthz(api: Api) -> None:
    assert api.get("healthz").json() == {"status": "ok"}


def test_unknown_route_is_a_json_404(api: Api) -> None:
    response = api.post("no_such_endpoint", {})
    assert response.status_code == 404
    assert response.json()["category"] == "user"


def test_malformed_json_is_a_400_with_a_body(api: Api) -> None:
    response = api.client.post(
        "/api/v1/create_session", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"].startswith("invalid request")


def test_missing_field_is_a_400_naming_it(api: Api) -> None:
    response = api.post("create_model", {"session_id": api.session(), "model_seq_id": 0})
    assert response.status_code == 400
    assert "base_model" in response.json()["error"]


def test_zstd_request_bodies_are_decompressed(api: Api) -> None:
    model_id = api.model()
    body = zstandard.ZstdCompressor().compress(fwdbwd_proto(model_id, 1, [1, 2, 3]))
    response = api.client.post(
        "/api/v1/forward_backward", content=body, headers={"content-type": PROTOBUF, "content-encoding": "zstd"}
    )
    assert response.status_code == 200, response.text
    assert "loss:sum" in api.result(response.json()["request_id"])["metrics"]


def test_corrupt_zstd_and_unknown_encodings_are_refused(api: Api) -> None:
    bad = api.client.post("/api/v1/create_session", content=b"nope", headers={"content-encoding": "zstd"})
    assert bad.status_code == 400 and "zstd" in bad.json()["error"]
    unknown = api.client.post("/api/v1/create_session", content=b"{}", headers={"content-encoding": "br"})
    assert unknown.status_code == 415


def test_zstd_bombs_are_stopped_at_the_body_limit(make_api: MakeApi) -> None:
    api = make_api(max_body_bytes=1000)
    body = zstandard.ZstdCompressor().compress(b" " * 100_000)
    response = api.client.post("/api/v1/create_session", content=body, headers={"content-encoding": "zstd"})
    assert response.status_code == 413


# -- auth ----------------------------------------------------------------------------------------------------------


def test_single_user_mode_accepts_any_key_or_none(api: Api) -> None:
    assert api.client.post("/api/v1/client/config", json={}, headers={"X-API-Key": "tml-whatever"}).status_code == 200
    api.client.headers.pop("X-API-Key")
    assert api.client.post("/api/v1/client/config", json={}).status_code == 200


def test_with_keys_unknown_or_missing_keys_get_401(make_api: MakeApi) -> None:
    api = make_api(api_keys={"tml-alice": "alice"})
    assert api.client.post("/api/v1/client/config", json={}, headers={"X-API-Key": "tml-alice"}).status_code == 200
    wrong = api.client.post("/api/v1/client/config", json={}, headers={"X-API-Key": "tml-mallory"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unknown API key"
    api.client.headers.pop("X-API-Key")
    assert api.client.post("/api/v1/client/config", json={}).status_code == 401


def test_keys_file_formats(tmp_path: Path) -> None:
    lines = tmp_path / "keys"
    lines.write_text("# comment\ntml-a alice\n\ntml-b  bob  # trailing\n")
    assert load_keys_file(lines) == {"tml-a": "alice", "tml-b": "bob"}
    as_json = tmp_path / "keys.json"
    as_json.write_text('{"tml-a": "alice"}')
    assert load_keys_file(as_json) == {"tml-a": "alice"}
    bad = tmp_path / "bad"
    bad.write_text("tml-a alice extra\n")
    with pytest.raises(InvalidRequestError, match="bad:1"):
        load_keys_file(bad)
