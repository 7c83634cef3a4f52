"""Who is calling: the ``X-API-Key`` header mapped to an owner.

Single-user mode (no keys configured) accepts any key, or none, and everything belongs to ``DEFAULT_OWNER``. With a
keys file, a key must be listed and its user owns every row the request creates or reads.

Keys file: one ``<key> <user>`` pair per line (``#`` starts a comment), or a JSON object ``{"<key>": "<user>"}``.
The SDK refuses keys that do not start with ``tml-``, so issue keys of that form.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from fastapi import Request

from tinkerd.domain.errors import InvalidRequestError, TinkerdError
from tinkerd.domain.ids import DEFAULT_OWNER, validate_owner

API_KEY_HEADER = "x-api-key"


class AuthenticationError(TinkerdError):
    """No or an unknown API key (maps to 401)."""


def load_keys_file(path: Path) -> dict[str, str]:
    """Parse a keys file into key -> owner; InvalidRequestError naming the line for a malformed one."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except ValueError as error:
            raise InvalidRequestError(f"keys file {path} is not valid JSON: {error}") from None
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise InvalidRequestError(f"keys file {path} must map key strings to user strings")
        pairs = list(raw.items())
    else:
        pairs = []
        for number, line in enumerate(text.splitlines(), start=1):
            content = line.split("#", 1)[0].strip()
            if not content:
                continue
            parts = content.split()
            if len(parts) != 2:
                raise InvalidRequestError(f"{path}:{number}: expected '<key> <user>', got {content!r}")
            pairs.append((parts[0], parts[1]))
    keys: dict[str, str] = {}
    for key, user in pairs:
        if key in keys:
            raise InvalidRequestError(f"keys file {path} lists key {key[:8]}... twice")
        keys[key] = validate_owner(user)
    if not keys:
        raise InvalidRequestError(f"keys file {path} lists no keys")
    return keys


class KeyRing:
    """Key -> owner, looked up by SHA-256 digest: the time a lookup takes says nothing about how much of a real key
    a guess matched, and the raw keys are not kept in memory."""

    def __init__(self, keys: Mapping[str, str] | None) -> None:
        self._by_digest = None if keys is None else {_digest(key): owner for key, owner in keys.items()}

    @property
    def single_user(self) -> bool:
        return self._by_digest is None

    def owner_of(self, key: str | None) -> str:
        if self._by_digest is None:
            return DEFAULT_OWNER
        if not key:
            raise AuthenticationError("missing X-API-Key header")
        found = self._by_digest.get(_digest(key))
        if found is None:
            raise AuthenticationError("unknown API key")
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def owner(request: Request) -> str:
    """FastAPI dependency: the owner of the calling key."""
    ring: KeyRing = request.app.state.keys
    return ring.owner_of(request.headers.get(API_KEY_HEADER))
