"""Headless Debian chromium driven by Playwright, for the console's browser tests.

Only the system's chromium is used (``make browser`` installs it with apt-get); Playwright's own browser builds are
never downloaded. Each launch gets a fresh profile directory.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

CHROMIUM = Path("/usr/bin/chromium")
# Flags that work as root in a container without a GPU or network (Playwright adds --headless itself).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# Where a developer finds the pages as the tests saw them (gitignored).
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"


def chromium_path() -> Path:
    found = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or CHROMIUM)
    if not found.exists():
        pytest.fail("chromium is not installed: run `make browser` (apt-get install chromium)")
    return found


@contextmanager
def browser_context(profile_dir: Path) -> Iterator[BrowserContext]:
    """A persistent context in ``profile_dir`` (fresh), closed with its browser on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=str(chromium_path()),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()
