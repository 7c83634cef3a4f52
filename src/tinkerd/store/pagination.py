"""Offset/limit checks shared by every listing (the wire protocol pages with offset, limit and total_count)."""

from __future__ import annotations

from tinkerd.domain.errors import InvalidRequestError

MAX_PAGE_SIZE = 1000
# Far past any real listing, and well inside a signed 64-bit SQL integer (a larger offset made SQLite overflow).
MAX_OFFSET = 2**53


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    if not 0 <= offset <= MAX_OFFSET:
        raise InvalidRequestError(f"offset must be between 0 and {MAX_OFFSET}, got {offset}")
