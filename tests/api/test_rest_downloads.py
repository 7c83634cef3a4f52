"""Checkpoint downloads and deletes: save_weights_external, signed per-file URLs, the tar archive of older SDKs.

The fake worker records checkpoint rows but writes no files, so each test lays out the files the real worker would
(``<data_dir>/checkpoints/<run>/<kind>/<name>/``); the e2e CLI test covers the real worker's files.
"""

from __future__ import annotations

import email.utils
import io
import os
import stat
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tinker import types
from tinker.cli.auth_api import SelfApiKeyResponse

from tests.api.conftest import Api, MakeApi
from tinkerd.api import ApiSettings, create_app
from tinkerd.api.signing import SECRET_FILE, UrlSigner
from tinkerd.domain import codec
from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.paths import parse_tinker_path
from tinkerd.domain.records import RequestKind
from tinkerd.domain.requests import SaveWeights
from tinkerd.store.files import CheckpointFiles

KEYS = {"tml-alice": "alice", "tml-bob": "bob"}
FILES = {
    "adapter_config.json": b'{"peft_type": "LORA"}',
    "adapter_model.safetensors": os.urandom(5000),  # not a multiple of 512: the tar pads it
    "extra/notes.txt": b"nested files keep their relative path",
}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def alice(make_api: MakeApi, data_dir: Path) -> Api:
    api = make_api(api_keys=KEYS, data_dir=data_dir)
    api.client.headers["X-API-Key"] = "tml-alice"
    return api


def anonymous(api: Api) -> TestClient:
    """A client of the same app that sends no API key."""
    return TestClient(api.client.app)


def signer_of(api: Api) -> UrlSigner:
    """The app's own signer: for links no route would hand out (expired ones, or ones to forbidden files)."""
    app = api.client.app
    assert isinstance(app, FastAPI) and app.state.ctx.signer is not None
    return app.state.ctx.signer


def lay_out(data_dir: Path, tinker_path: str, files: dict[str, bytes] = FILES) -> Path:
    directory = CheckpointFiles(data_dir).dir_of(parse_tinker_path(tinker_path))
    for relpath, content in files.items():
        (directory / relpath).parent.mkdir(parents=True, exist_ok=True)
        (directory / relpath).write_bytes(content)
    return directory


def export(api: Api, data_dir: Path, name: str = "e1", **extra: Any) -> tuple[str, str]:
    """(model id, tinker path) of an external_weights checkpoint with FILES on disk."""
    model_id = api.model()
    body = {"model_id": model_id, "path": name, "seq_id": 1, **extra}
    result = api.result(api.ok("save_weights_external", body)["request_id"])
    lay_out(data_dir, result["path"])
    return model_id, result["path"]


def rest_base(tinker_path: str) -> str:
    path = parse_tinker_path(tinker_path)
    return f"training_runs/{path.run_id}/checkpoints/{path.kind}/{path.name}"


def urls_of(api: Api, tinker_path: str, **params: int) -> dict[str, Any]:
    response = api.get(f"{rest_base(tinker_path)}/external_weights_urls", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


def test_save_weights_external_is_a_future_that_names_an_external_checkpoint(alice: Api) -> None:
    model_id = alice.model()
    body = {"model_id": model_id, "path": "export", "seq_id": 1, "ttl_seconds": 3600, "type": "save_weights_external"}
    result = alice.result(alice.ok("save_weights_external", body)["request_id"])
    assert result["type"] == "save_weights_external"
    assert result["path"] == f"tinker://{model_id}/external_weights/export" and result["size_bytes"] == 1234
    # What the worker is asked to do: write the adapter (no optimizer) under external_weights/, never over another.
    request = codec.decode(alice.worker.executed[-1].payload or b"")
    assert request == SaveWeights(model_id, "external_weights", "export", ttl_seconds=3600, overwrite=False)
    assert alice.worker.executed[-1].kind is RequestKind.SAVE_WEIGHTS_EXTERNAL
    [listed] = alice.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"]
    assert (listed["checkpoint_id"], listed["checkpoint_type"]) == ("external_weights/export", "external")

    refused = {"model_id": model_id, "path": "enc", "seq_id": 2, "age_encryption_recipients": ["age1xyz"]}
    response = alice.post("save_weights_external", refused)
    assert response.status_code == 400 and "age_encryption_recipients" in response.json()["detail"]
    bad_name = alice.post("save_weights_external", {"model_id": model_id, "path": "../x", "seq_id": 3})
    assert bad_name.status_code == 400 and "../x" in bad_name.json()["detail"]


def test_signed_urls_fetch_every_file_without_a_key(alice: Api, data_dir: Path) -> None:
    _, tinker_path = export(alice, data_dir)
    body = urls_of(alice, tinker_path)
    assert sorted(body["urls"]) == sorted(FILES)
    assert types.ExternalWeightsUrlsResponse.model_validate(body).urls == body["urls"]  # as the SDK reads it
    expires = datetime.fromisoformat(body["expires"])
    assert 3500 < (expires - datetime.now(UTC)).total_seconds() <= 3601
    assert body["total_count"] == 3 and body["next_page_token"] is None
    assert {f["relative_file_name"]: f["size_bytes"] for f in body["files"]} == {k: len(v) for k, v in FILES.items()}

    client = anonymous(alice)
    assert client.get(f"/api/v1/{rest_base(tinker_path)}/external_weights_urls").status_code == 401
    for relpath, url in body["urls"].items():
        response = client.get(url)
        assert response.status_code == 200, response.text
        assert response.content == FILES[relpath]
        assert int(response.headers["content-length"]) == len(FILES[relpath])


def test_altered_links_are_refused(alice: Api, data_dir: Path) -> None:
    _, tinker_path = export(alice, data_dir)
    urls = urls_of(alice, tinker_path)["urls"]
    client = anonymous(alice)
    config_url, weights_url = urls["adapter_config.json"], urls["adapter_model.safetensors"]
    query = urlsplit(config_url).query
    sig = parse_qs(query)["sig"][0]
    expires = parse_qs(query)["expires"][0]
    altered = {
        "another file": weights_url.split("?")[0] + "?" + query,
        "a later expiry": with_query(config_url, expires=str(int(expires) + 3600)),
        "a non-numeric expiry": with_query(config_url, expires="never"),
        "another signature": with_query(config_url, sig=("A" if sig[0] != "A" else "B") + sig[1:]),
        "no signature": config_url.split("?")[0],
        "another checkpoint": config_url.replace("/e1/", "/e2/"),
    }
    for what, url in altered.items():
        response = client.get(url)
        assert response.status_code == 403, (what, response.text)
        assert "signed" in response.json()["detail"] or "altered" in response.json()["detail"], what


def test_an_expired_link_is_refused_saying_so(alice: Api, data_dir: Path) -> None:
    _, tinker_path = export(alice, data_dir)
    url = urls_of(alice, tinker_path)["urls"]["adapter_config.json"]
    signer = signer_of(alice)
    path = parse_tinker_path(tinker_path)
    past = int(time.time()) - 5
    resource = f"{path.run_id}/{path.kind}/{path.name}/adapter_config.json"
    expired = with_query(url, expires=str(past), sig=signer.sign("file", resource, past))
    response = anonymous(alice).get(expired)
    assert response.status_code == 410 and "expired" in response.json()["detail"]


def test_no_link_reaches_outside_its_checkpoint(alice: Api, data_dir: Path, tmp_path: Path) -> None:
    model_id, tinker_path = export(alice, data_dir)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for download")
    directory = CheckpointFiles(data_dir).dir_of(parse_tinker_path(tinker_path))
    (directory / "escape").symlink_to(secret)
    (directory / ".hidden").write_text("ours")
    assert sorted(urls_of(alice, tinker_path)["urls"]) == sorted(FILES)  # no symlink, no hidden file

    # Even a correctly signed link (as if the secret leaked) cannot climb out: traversal, symlinks, hidden files.
    signer = signer_of(alice)
    expires = int(time.time()) + 60
    client = anonymous(alice)
    base = f"{model_id}/external_weights/e1"
    for relpath in ("escape", ".hidden", "%2e%2e/%2e%2e/%2e%2e/url-signing.key", "extra/%2e%2e/adapter_config.json"):
        sig = signer.sign("file", f"{base}/{relpath.replace('%2e', '.')}", expires)
        response = client.get(f"/api/v1/files/{base}/{relpath}?expires={expires}&sig={sig}")
        # The signature holds, so each reaches the file lookup, which refuses it.
        assert response.status_code == 404 and "no file" in response.json()["detail"], (relpath, response.text)
        assert b"not for download" not in response.content
    files = CheckpointFiles(data_dir)
    for relpath in ("/etc/passwd", "../e1/adapter_config.json", "escape", "", "extra/../adapter_config.json"):
        with pytest.raises(NotFoundError):
            files.file_of(parse_tinker_path(tinker_path), relpath)


def test_urls_page_like_baseten_file_lists(alice: Api, data_dir: Path) -> None:
    _, tinker_path = export(alice, data_dir)
    first = urls_of(alice, tinker_path, page_size=2)
    assert list(first["urls"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (first["total_count"], first["next_page_token"]) == (3, 2)
    rest = urls_of(alice, tinker_path, page_size=2, page_token=first["next_page_token"])
    assert (list(rest["urls"]), rest["next_page_token"]) == (["extra/notes.txt"], None)
    for params in ({"page_size": 0}, {"page_size": 1001}, {"page_token": -1}):
        assert alice.get(f"{rest_base(tinker_path)}/external_weights_urls", params=params).status_code == 400


def test_urls_only_for_external_weights_a_reader_may_see(alice: Api, data_dir: Path) -> None:
    model_id, tinker_path = export(alice, data_dir)
    alice.result(alice.ok("save_weights", {"model_id": model_id, "path": "w", "seq_id": 2})["request_id"])
    response = alice.get(f"training_runs/{model_id}/checkpoints/weights/w/external_weights_urls")
    assert response.status_code == 400 and "save_weights_external" in response.json()["detail"]
    unknown = f"training_runs/{model_id}/checkpoints/external_weights/nope/external_weights_urls"
    assert alice.get(unknown).status_code == 404
    alice.client.headers["X-API-Key"] = "tml-bob"
    assert alice.get(f"{rest_base(tinker_path)}/external_weights_urls").status_code == 404
    alice.client.headers["X-API-Key"] = "tml-alice"
    assert alice.client.post(f"/api/v1/{rest_base(tinker_path)}/publish").status_code == 200
    alice.client.headers["X-API-Key"] = "tml-bob"
    assert sorted(urls_of(alice, tinker_path)["urls"]) == sorted(FILES)  # published: anyone may download


def test_delete_removes_row_files_and_links(alice: Api, data_dir: Path) -> None:
    model_id, tinker_path = export(alice, data_dir)
    _, kept = export(alice, data_dir, name="e2")
    directory = CheckpointFiles(data_dir).dir_of(parse_tinker_path(tinker_path))
    url = urls_of(alice, tinker_path)["urls"]["adapter_config.json"]
    alice.client.headers["X-API-Key"] = "tml-bob"
    assert alice.client.delete(f"/api/v1/{rest_base(tinker_path)}").status_code == 404  # not bob's
    alice.client.headers["X-API-Key"] = "tml-alice"

    assert alice.client.delete(f"/api/v1/{rest_base(tinker_path)}").status_code == 200
    assert not directory.exists() and not any(p.name.startswith(".") for p in directory.parent.iterdir())
    assert alice.get(f"training_runs/{model_id}/checkpoints").json()["checkpoints"] == []
    assert anonymous(alice).get(url).status_code == 404  # a signed link dies with its checkpoint
    assert alice.client.delete(f"/api/v1/{rest_base(tinker_path)}").status_code == 404
    assert alice.client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/bogus/e1").status_code == 400
    # Other checkpoints are untouched.
    assert CheckpointFiles(data_dir).dir_of(parse_tinker_path(kept)).is_dir()
    assert sorted(urls_of(alice, kept)["urls"]) == sorted(FILES)


def test_a_published_checkpoint_can_be_deleted_only_by_its_owner(alice: Api, data_dir: Path) -> None:
    _, tinker_path = export(alice, data_dir)
    assert alice.client.post(f"/api/v1/{rest_base(tinker_path)}/publish").status_code == 200
    alice.client.headers["X-API-Key"] = "tml-bob"
    response = alice.client.delete(f"/api/v1/{rest_base(tinker_path)}")
    assert response.status_code == 403 and "owner" in response.json()["detail"]
    assert alice.store.checkpoints.get(tinker_path, "alice").public


def test_an_expired_checkpoint_is_not_served(alice: Api, data_dir: Path) -> None:
    _, tinker_path = export(alice, data_dir)
    url = urls_of(alice, tinker_path)["urls"]["adapter_config.json"]
    alice.store.checkpoints.set_expiry(tinker_path, "alice", datetime(2020, 1, 1, tzinfo=UTC))
    assert anonymous(alice).get(url).status_code == 404  # before the reaper gets to it


def test_archive_redirects_to_a_streamed_tar(alice: Api, data_dir: Path, tmp_path: Path) -> None:
    model_id = alice.model()
    body = {"model_id": model_id, "path": "s1", "seq_id": 1}
    tinker_path = alice.result(alice.ok("save_weights_for_sampler", body)["request_id"])["path"]
    lay_out(data_dir, tinker_path)

    # As SDKs up to 0.33 ask: redirects off, Location and Expires read from the 302.
    response = alice.client.get(f"/api/v1/{rest_base(tinker_path)}/archive", follow_redirects=False)
    assert response.status_code == 302
    location = response.headers["location"]
    expires = email.utils.parsedate_to_datetime(response.headers["expires"])
    assert 3500 < (expires - datetime.now(UTC)).total_seconds() <= 3601
    assert response.json()["url"] == location

    download = anonymous(alice).get(location)
    assert download.status_code == 200 and download.headers["content-type"] == "application/x-tar"
    assert int(download.headers["content-length"]) == len(download.content)
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == sorted([*FILES, "checkpoint_complete"])
        assert all(m.isreg() and stat.S_IMODE(m.mode) == 0o644 for m in members.values())
        for relpath, content in FILES.items():
            extracted = tar.extractfile(relpath)
            assert extracted is not None and extracted.read() == content
    # The archive's signature opens only the archive; an altered one nothing.
    assert anonymous(alice).get(with_query(location, expires="1")).status_code == 403
    file_route = location.replace("/archives/", "/files/").replace(".tar?", "/adapter_config.json?")
    assert anonymous(alice).get(file_route).status_code == 403
    alice.client.headers["X-API-Key"] = "tml-bob"
    assert alice.client.get(f"/api/v1/{rest_base(tinker_path)}/archive", follow_redirects=False).status_code == 404


def test_links_outlive_a_restart_and_the_secret_is_private(alice: Api, data_dir: Path) -> None:
    _, tinker_path = export(alice, data_dir)
    url = urls_of(alice, tinker_path)["urls"]["adapter_config.json"]
    assert stat.S_IMODE((data_dir / SECRET_FILE).stat().st_mode) == 0o600
    again = TestClient(create_app(alice.store, [], settings=ApiSettings(data_dir=data_dir)))
    assert again.get(url).content == FILES["adapter_config.json"]
    (data_dir / SECRET_FILE).unlink()  # revokes every link
    revoked = TestClient(create_app(alice.store, [], settings=ApiSettings(data_dir=data_dir)))
    assert revoked.get(url).status_code == 403


def test_without_a_data_dir_downloads_are_not_found(api: Api) -> None:
    model_id = api.model()
    body = {"model_id": model_id, "path": "e", "seq_id": 1}
    tinker_path = api.result(api.ok("save_weights_external", body)["request_id"])["path"]
    response = api.get(f"{rest_base(tinker_path)}/external_weights_urls")
    assert response.status_code == 404 and "data directory" in response.json()["detail"]


def test_api_key_me_and_checkpoint_storage(alice: Api, data_dir: Path) -> None:
    export(alice, data_dir)
    me = alice.get("auth/apikey/me").json()
    SelfApiKeyResponse.model_validate(me)  # what `tinker auth login` parses
    assert me["details"] == {"org_details": {"name": "tinkerd"}, "user_details": {"email": "alice"}}
    assert isinstance(me["key_id"], int) and me["name"] and me["note"] == ""
    assert anonymous(alice).get("/api/v1/auth/apikey/me", headers={"X-API-Key": "tml-nobody"}).status_code == 401
    storage = alice.get("billing/usage/checkpoints/current").json()
    types.CurrentCheckpointStorageUsageResponse.model_validate(storage)
    assert storage["data"] == [
        {"org_user_urn": "alice", "user_name": "alice", "checkpoint_count": 1, "size_bytes": 1234,
         "size_gigabytes": 1234e-9},
    ]  # fmt: skip
    assert alice.get("billing/usage/checkpoints/current", params={"project_id": "p"}).status_code == 400


def test_what_tinkerd_does_not_record_is_not_found_saying_so(alice: Api) -> None:
    usage = alice.get("billing/usage/events", params={"starting_on": "2026-01-01T00:00:00Z"})
    assert usage.status_code == 404 and "no billing usage" in usage.json()["detail"]
    trace = alice.get(f"sessions/{alice.session()}/trace_export")
    assert trace.status_code == 404 and "no session traces" in trace.json()["detail"]
