"""Signed download URLs: a link to a checkpoint's file (or archive) that works without an API key until it expires.

A link carries ``expires`` (POSIX seconds) and ``sig`` = HMAC-SHA256(secret, "<purpose>\\n<resource>\\n<expires>") in
unpadded base64url. Changing the resource (the path in the URL), the expiry or the signature breaks the signature;
the purpose ("file", "archive") keeps a signature made for one route from opening another. The secret is 32 random
bytes made once per data directory and kept in ``<data_dir>/url-signing.key`` (mode 0600), so links stay valid
across restarts and every API process sharing the data directory accepts them. Deleting the file revokes every link.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tinkerd.domain.errors import PermissionDeniedError, TinkerdError

SECRET_FILE = "url-signing.key"
_SECRET_BYTES = 32


class BadSignatureError(PermissionDeniedError):
    """A download link without a valid signature: missing, altered, or made for something else (maps to 403)."""


class ExpiredLinkError(TinkerdError):
    """A correctly signed download link whose time is up (maps to 410)."""


class UrlSigner:
    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < 16:
            raise ValueError("a URL signing secret needs at least 16 bytes")
        self._secret = secret
        self._clock = clock

    def expiry(self, ttl_s: float) -> int:
        """POSIX seconds `ttl_s` from now, rounded up to a whole second."""
        return int(self._clock() + ttl_s) + 1

    def sign(self, purpose: str, resource: str, expires: int) -> str:
        message = f"{purpose}\n{resource}\n{expires}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def check(self, purpose: str, resource: str, expires: str | None, signature: str | None) -> None:
        """Return if the link is genuine and current; BadSignatureError or ExpiredLinkError saying why not."""
        if not expires or not signature:
            raise BadSignatureError("this download link is not signed: ask the API for download URLs")
        try:
            expires_at = int(expires)
        except ValueError:
            raise BadSignatureError("this download link has been altered (its expiry is not a number)") from None
        if not hmac.compare_digest(self.sign(purpose, resource, expires_at), signature):
            raise BadSignatureError("this download link has been altered, or was signed for something else")
        if self._clock() >= expires_at:
            when = datetime.fromtimestamp(expires_at, UTC).isoformat()
            raise ExpiredLinkError(f"this download link expired at {when}; ask the API for new download URLs")


def load_or_create_secret(data_dir: Path) -> bytes:
    """The data directory's signing secret, made on first use. Concurrent first uses agree on one secret: each
    writes its candidate to a private temporary file and hard-links it into place, and the loser reads the winner's."""
    path = Path(data_dir) / SECRET_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = path.with_name(f".{SECRET_FILE}.{secrets.token_hex(8)}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as sink:
            sink.write(secrets.token_hex(_SECRET_BYTES) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(candidate, path)
    finally:
        candidate.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)  # someone loosened it: other local users must not be able to forge links
    text = path.read_text(encoding="ascii").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path} is not a hex-encoded secret; delete it to make a new one") from None
    if len(secret) < 16:
        raise ValueError(f"{path} holds a secret shorter than 16 bytes; delete it to make a new one")
    return secret
