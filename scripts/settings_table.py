"""Rewrite the README's Settings table from `tinkerd.settings` (the fields' metadata is the one source).

.venv/bin/python -m scripts.settings_table          # rewrites README.md in place
.venv/bin/python -m scripts.settings_table --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from tinkerd.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- settings table: generated from src/tinkerd/settings.py by `python -m scripts.settings_table` -->\n"
END = "<!-- end of settings table -->\n"


def with_table(text: str) -> str:
    """`text` with the part between the markers replaced by the current table."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + settings_table() + text[end:]


def main(argv: list[str]) -> int:
    text = README.read_text()
    updated = with_table(text)
    if "--check" in argv:
        return 0 if updated == text else 1
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
