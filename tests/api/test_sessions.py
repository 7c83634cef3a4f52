"""Sessions: create, heartbeat (410 once finished, which stops the SDK's loop), finish, REST views."""

from __future__ import annotations

from tests.api.conftest import Api


def test_create_session_keeps_what_the_client_sent(api: Api) -> None:
    body = {"tags": ["a"], "user_metadata": {"k": "v"}, "sdk_version": "0.38.0", "display_name": "demo"}
    response = api.ok("create_session", body)
    assert response["type"] == "create_session"
    session = api.store.sessions.get(response["session_id"], "local")
    assert (session.tags, session.user_metadata, session.display_name) == (("a",), {"k": "v"}, "demo")


def test_old_sdks_without_optional_fields_can_create_sessions(api: Api) -> None:
    assert api.ok("create_session", {"tags": [], "user_metadata": None, "sdk_version": "0.9.0"})["session_id"]


def test_heartbeat_then_finish_then_410(api: Api) -> None:
    session_id = api.session()
    assert api.ok("session_heartbeat", {"session_id": session_id, "type": "session_heartbeat"}) == {
        "type": "session_heartbeat"
    }
    api.ok(f"sessions/{session_id}/finish", {"reason": {"type": "success"}, "detail": None})
    gone = api.post("session_heartbeat", {"session_id": session_id})
    assert gone.status_code == 410
    assert "finished" in gone.json()["error"]
    # Finishing twice is harmless (the SDK retries finish).
    api.ok(f"sessions/{session_id}/finish", {"reason": {"type": "errored"}, "detail": "boom"})


def test_heartbeat_or_finish_of_unknown_sessions_is_404(api: Api) -> None:
    assert api.post("session_heartbeat", {"session_id": "nope"}).status_code == 404
    assert api.post("sessions/nope/finish", {"reason": {"type": "success"}}).status_code == 404
    assert api.post("session_heartbeat", {"session_id": "../etc"}).status_code == 400


def test_session_views_list_runs_and_samplers(api: Api) -> None:
    session_id = api.session()
    model_id = api.model(session_id)
    api.ok(
        "create_sampling_session", {"session_id": session_id, "sampling_session_seq_id": 0, "base_model": "tiny/model"}
    )
    view = api.get(f"sessions/{session_id}").json()
    assert view["training_run_ids"] == [model_id]
    assert view["sampler_ids"] == [f"{session_id}:sample:0"]
    assert session_id in api.get("sessions").json()["sessions"]
