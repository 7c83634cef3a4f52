"""What every answer to a hostile request must satisfy."""

from __future__ import annotations

import json
from typing import Any

from tests.hardening.live import Live


def check_answer(response: Any, what: str) -> None:
    """Never a 5xx; a 4xx carries a JSON body whose message says something (the SDK shows it to the user)."""
    status = response.status_code
    assert status < 500, f"{what}: {status} {response.text[:500]}"
    if status >= 400:
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"{what}: {status} with a body that is not JSON: {response.content[:200]!r}") from None
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip(), (what, body)
        assert body.get("category") == "user", (what, body)


def check_future(live: Live, response: Any, key: str | None = None) -> dict[str, Any] | bytes:
    """An accepted request's outcome: success, or a failure the user caused (category "user") with a message."""
    request_id = response.json()["request_id"]
    outcome = live.wait(request_id, key=key, accept="application/x-protobuf, application/json")
    if isinstance(outcome, dict) and "error" in outcome:
        assert outcome.get("category") == "user" and outcome["error"].strip(), outcome
    return outcome
