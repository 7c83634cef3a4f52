"""copy_weights, assign_session_project and search_sessions, through the real SDK's RestClient and ServiceClient
against the in-process app (the SDK's own request encoding and response parsing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types

from tests.api.conftest import Api, MakeApi
from tinkerd.domain.paths import parse_tinker_path
from tinkerd.store.files import CheckpointFiles


def _session(api: Api, **body: Any) -> str:
    return api.ok("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", **body})["session_id"]


def _search(api: Api, **request: Any) -> Any:
    response = api.post("sessions/search", request)
    assert response.status_code == 200, response.text
    return types.SessionSearchResponse.model_validate(response.json())


def test_copy_weights_makes_a_checkpoint_of_a_new_run_in_the_project(make_api: MakeApi, tmp_path: Path) -> None:
    api = make_api(data_dir=tmp_path)
    files = CheckpointFiles(tmp_path)
    run = api.model()
    source = api.result(api.ok("save_weights", {"model_id": run, "path": "w1", "seq_id": 1})["request_id"])["path"]
    source_dir = files.dir_of(parse_tinker_path(source))  # the fake worker writes no files: lay them out
    (source_dir / "sub").mkdir(parents=True)
    (source_dir / "adapter_model.safetensors").write_bytes(b"weights")
    (source_dir / "sub" / "meta.json").write_bytes(b"{}")
    answer = api.ok("copy_weights", {"source_path": source, "destination_project_id": "archive", "ttl_seconds": 7200})
    copy = answer["tinker_path"]
    assert copy.endswith("/weights/w1") and not copy.startswith(f"tinker://{run}/")
    copy_run = copy.removeprefix("tinker://").split("/")[0]
    listed = api.get(f"training_runs/{copy_run}/checkpoints").json()["checkpoints"]
    assert [c["tinker_path"] for c in listed] == [copy] and listed[0]["expires_at"] is not None
    copied = files.dir_of(parse_tinker_path(copy)) / "adapter_model.safetensors"
    assert copied.read_bytes() == b"weights"
    assert copied.stat().st_ino == (source_dir / "adapter_model.safetensors").stat().st_ino  # shared, not duplicated
    assert (files.dir_of(parse_tinker_path(copy)) / "sub" / "meta.json").read_bytes() == b"{}"
    session = api.store.runs.get(copy_run, "local").session_id
    assert api.store.sessions.get(session, "local").project_id == "archive"
    # Into a session slot the caller names; a second copy into the same slot is a conflict.
    target = _session(api)
    body = {"source_path": source, "session_id": target, "model_seq_id": 3}
    assert api.ok("copy_weights", body)["tinker_path"] == f"tinker://{target}:train:3/weights/w1"
    assert api.post("copy_weights", body).status_code == 409
    assert api.post("copy_weights", {"source_path": source}).status_code == 400
    missing = api.post("copy_weights", {"source_path": f"tinker://{run}/weights/nope", "destination_project_id": "p"})
    assert missing.status_code == 404


def test_assign_session_project_and_search(api: Api) -> None:
    nightly = _session(api, display_name="Nightly SFT run", user_metadata={"team": "a"})
    other = _session(api, display_name="ablation", project_id="p1")
    assert api.client.put(f"/api/v1/sessions/{nightly}/project", json={"project_id": "p2"}).status_code == 200
    assert api.store.sessions.get(nightly, "local").project_id == "p2"
    assert api.client.put(f"/api/v1/sessions/{nightly}/project", json={}).status_code == 400
    assert api.client.put("/api/v1/sessions/nope/project", json={"project_id": "p"}).status_code == 404

    page = _search(api)
    assert [s.session_id for s in page.sessions][:2] == [other, nightly]  # newest first
    assert [s.session_id for s in _search(api, display_name="sft nightly").sessions] == [nightly]
    assert [s.session_id for s in _search(api, display_name="zzz", session_id=other).sessions] == [other]
    assert [s.session_id for s in _search(api, project_ids=["p1"]).sessions] == [other]
    assert [s.session_id for s in _search(api, user_metadata={"team": "a"}).sessions] == [nightly]
    api.post(f"sessions/{other}/finish", {"reason": {"type": "errored"}})
    finished = _search(api, statuses=[{"type": "client_finished", "reasons": ["errored"]}]).sessions
    assert [s.session_id for s in finished] == [other]
    assert next(s.session_id for s in _search(api, statuses=[{"type": "active"}]).sessions) == nightly
    summary = _search(api, session_id=nightly).sessions[0]
    assert (summary.project_id, summary.display_name, summary.owner) == ("p2", "Nightly SFT run", "local")
    assert _search(api, owner={"type": "user", "owner_urns": ["someone-else"]}).sessions == []


def test_search_pages_with_the_cursor(api: Api) -> None:
    made = [_session(api) for _ in range(5)]
    seen: list[str] = []
    request: dict[str, Any] = {"limit": 2}
    while True:
        page = _search(api, **request)
        seen.extend(s.session_id for s in page.sessions)
        if page.next_cursor is None:
            break
        request["cursor"] = page.next_cursor.model_dump(mode="json")
    assert seen == made[::-1]


@pytest.mark.parametrize("limit", [0, 201])
def test_a_bad_limit_is_a_400(api: Api, limit: int) -> None:
    assert api.post("sessions/search", {"limit": limit}).status_code == 400


def test_sdk_types_round_trip() -> None:
    request = types.SessionSearchRequest(display_name="x", owner=types.AccessibleSearchOwner())
    assert request.model_dump(mode="json", exclude_none=True)["owner"] == {"type": "accessible"}
    assert tinker.__version__.startswith("0.38")
