"""Requests to endpoints tinkerd lacks: a 404 naming them, and the run's seq_id filled so later requests still run."""

from __future__ import annotations

from tests.api.conftest import Api, MakeApi


def test_an_unknown_endpoint_is_a_404_naming_it(api: Api) -> None:
    response = api.post("no_such_thing", {"x": 1})
    assert response.status_code == 404
    assert response.json()["error"] == "tinkerd does not implement POST /api/v1/no_such_thing"
    assert api.client.post("/api/v1/binary_thing", content=b"\xff\x00").status_code == 404
    # Other methods, also on paths that exist for another method.
    assert api.get("no_such_thing").json()["error"] == "tinkerd does not implement GET /api/v1/no_such_thing"
    patched = api.client.patch("/api/v1/training_runs/s:train:0/checkpoints/weights/x")
    assert patched.status_code == 404 and "PATCH" in patched.json()["error"]
    assert api.client.put("/api/v1/sessions/s/project", json={"project_id": "p"}).status_code == 404


def test_a_training_request_to_an_unknown_endpoint_does_not_stall_its_run(api: Api) -> None:
    """What a newer SDK's training call does against a tinkerd without its endpoint: seq 1 must not block seq 2."""
    model_id = api.model()
    refused = api.post("brand_new_training_call", {"model_id": model_id, "seq_id": 1, "path": "x"})
    assert refused.status_code == 404 and "brand_new_training_call" in refused.json()["error"]
    request_id = api.forward_backward(model_id, 2).json()["request_id"]
    assert api.result(request_id)["metrics"] == {"loss:sum": 3.0}
    # Seq 1 is taken by a failed placeholder (a forward_backward stand-in: the name is no known kind); a repeat of
    # that seq_id gets the placeholder's error.
    taken = api.forward_backward(model_id, 1).json()["request_id"]
    assert "brand_new_training_call" in api.retrieve(taken).json()["error"]


def test_unknown_endpoints_fill_only_the_callers_own_runs(make_api: MakeApi) -> None:
    api = make_api(api_keys={"tml-alice": "alice", "tml-bob": "bob"})
    api.client.headers["X-API-Key"] = "tml-alice"
    model_id = api.model(api.session())
    api.client.headers["X-API-Key"] = "tml-bob"
    for body in ({"model_id": model_id, "seq_id": 1}, {"model_id": "s:train:9", "seq_id": 1}):
        assert api.post("brand_new_training_call", body).status_code == 404
    api.client.headers["X-API-Key"] = "tml-alice"
    for body in ({"model_id": model_id, "seq_id": "1"}, {"model_id": model_id}, {"seq_id": 1}):
        assert api.post("brand_new_training_call", body).status_code == 404
    assert api.client.post("/api/v1/brand_new_training_call", json=[model_id, 1]).status_code == 404
    # None of those took Alice's seq 1.
    assert api.result(api.forward_backward(model_id, 1).json()["request_id"])["metrics"] == {"loss:sum": 3.0}


def test_an_unknown_endpoint_survives_any_body(api: Api) -> None:
    model_id = api.model()
    for body in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"model_id": "%s", "seq_id": 99999999999999999999}' % model_id.encode(),
    ):
        response = api.client.post("/api/v1/brand_new_training_call", content=body)
        assert response.status_code == 404 and "brand_new_training_call" in response.json()["error"]
    assert api.result(api.forward_backward(model_id, 1).json()["request_id"])["metrics"] == {"loss:sum": 3.0}
