"""Identifiers: sessions, training runs, samplers, requests, owners.

The SDK computes training-run ids itself (`<session_id>:train:<model_seq_id>`, see the wire protocol §2.6) and
puts run ids into `tinker://` paths and REST URLs, so every id we mint or accept must be a safe single path
segment: no `/`, no `\\`, no control characters, never `.` or `..`. The allow-lists below are deliberately narrow;
widening one later is easy, narrowing it after users have data is not.
"""

from __future__ import annotations

import re
import uuid

from tinkerd.domain.errors import InvalidRequestError

# Single-user mode stores everything under this owner; multi-user deployments use the authenticated user id.
DEFAULT_OWNER = "local"

MAX_ID_LENGTH = 128

# Session ids may not contain ':' because ':' separates the parts of run and sampler ids.
_SESSION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
# Run and sampler ids: anything a session id allows, plus ':' (the SDK's own separator).
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]*")
_TRAINING_RUN_ID = re.compile(r"(?P<session>.+):train:(?P<seq>0|[1-9][0-9]*)")
_SAMPLER_ID = re.compile(r"(?P<session>.+):sample:(?P<seq>0|[1-9][0-9]*)")
_OWNER = re.compile(r"[^\x00-\x1f\x7f]+")


def _check(kind: str, value: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{kind} must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidRequestError(f"{kind} is longer than {MAX_ID_LENGTH} characters: {value[:40]!r}...")
    if pattern.fullmatch(value) is None:
        raise InvalidRequestError(
            f"{kind} {value!r} is not valid: use letters, digits, '_', '.', '-'"
            + (", ':'" if pattern is _RUN_ID else "")
            + " and start with a letter, digit or '_'"
        )
    return value


def validate_session_id(value: object) -> str:
    """The value as a session id, or InvalidRequestError naming it."""
    return _check("session id", value, _SESSION_ID)


def validate_run_id(value: object) -> str:
    """The value as a training-run (model) id, or InvalidRequestError naming it.

    Accepts any safe id, not only our own `<session>:train:<n>` form, so that runs imported from elsewhere keep
    their names.
    """
    return _check("training run id", value, _RUN_ID)


def validate_sampler_id(value: object) -> str:
    return _check("sampler id", value, _RUN_ID)


def validate_owner(value: object) -> str:
    """Owners are opaque user ids; they never reach the file system, so only control characters are refused."""
    if not isinstance(value, str) or not value or len(value) > 255 or _OWNER.fullmatch(value) is None:
        raise InvalidRequestError(f"owner {value!r} is not a valid user id")
    return value


def new_session_id() -> str:
    return str(uuid.uuid4())


def new_request_id() -> str:
    # Opaque to the client; a uuid keeps ids unguessable across owners.
    return f"req-{uuid.uuid4().hex}"


def training_run_id(session_id: str, model_seq_id: int) -> str:
    """The id the SDK itself assumes for the `model_seq_id`-th training client of a session."""
    validate_session_id(session_id)
    if model_seq_id < 0:
        raise InvalidRequestError(f"model_seq_id must be >= 0, got {model_seq_id}")
    return validate_run_id(f"{session_id}:train:{model_seq_id}")


def sampler_id(session_id: str, sampling_session_seq_id: int) -> str:
    """The official sampler id format `<session_id>:sample:<n>`."""
    validate_session_id(session_id)
    if sampling_session_seq_id < 0:
        raise InvalidRequestError(f"sampling_session_seq_id must be >= 0, got {sampling_session_seq_id}")
    return validate_sampler_id(f"{session_id}:sample:{sampling_session_seq_id}")


def parse_training_run_id(value: str) -> tuple[str, int]:
    """(session_id, model_seq_id) of one of our run ids, or InvalidRequestError."""
    validate_run_id(value)
    match = _TRAINING_RUN_ID.fullmatch(value)
    if match is None:
        raise InvalidRequestError(f"{value!r} is not a training run id of the form <session_id>:train:<n>")
    return validate_session_id(match["session"]), int(match["seq"])


def parse_sampler_id(value: str) -> tuple[str, int]:
    """(session_id, sampling_session_seq_id) of one of our sampler ids, or InvalidRequestError."""
    validate_sampler_id(value)
    match = _SAMPLER_ID.fullmatch(value)
    if match is None:
        raise InvalidRequestError(f"{value!r} is not a sampler id of the form <session_id>:sample:<n>")
    return validate_session_id(match["session"]), int(match["seq"])
