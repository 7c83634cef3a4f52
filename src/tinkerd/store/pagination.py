"""Offset/limit checks shared by every listing (the wire protocol pages with offset, limit and total_count)."""

from __future__ import annotations

from tinkerd.domain.errors import InvalidRequestError

MAX_PAGE_SIZE = 1000


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidRequestError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    if offset < 0:
        raise InvalidRequestError(f"offset must be >= 0, got {offset}")
