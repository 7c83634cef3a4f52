"""The README's Layout section names every package and module of src/tinkerd and every top-level directory of code."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _layout() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Layout") : text.index("\n## ", text.index("## Layout") + 1)]


def test_the_layout_names_every_package_and_module() -> None:
    layout = _layout()
    package = ROOT / "src" / "tinkerd"
    entries = [
        p.name + ("/" if p.is_dir() else "")
        for p in package.iterdir()
        if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")
    ]
    assert len(entries) >= 10  # the listing itself found the tree
    missing = [name for name in entries if name not in layout]
    assert not missing, f"README.md's Layout does not mention {missing}"
    for directory in ("bench/", "examples/", "scripts/", "tests/"):
        assert directory in layout
    for script in (ROOT / "scripts").glob("*.py"):
        assert script.name.startswith("_") or script.name in layout, script.name


def test_the_layout_names_nothing_that_is_gone() -> None:
    layout = _layout()
    package = ROOT / "src" / "tinkerd"
    for word in layout.split():
        word = word.rstrip(",;:")
        if word.endswith(".py") and "/" not in word and word not in ("pig_latin.py",):
            found = list(package.rglob(word)) + list((ROOT / "scripts").glob(word))
            assert found, f"README.md's Layout names {word}, which is not in the tree"
