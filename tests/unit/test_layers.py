"""The import rules of architecture.md, enforced by import-linter's contracts in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_layers_hold() -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint_imports)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every contract in pyproject.toml was checked and kept, however many there are (a literal count broke whenever
    # one was added).
    declared = len(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"])
    assert declared >= 5
    assert f"Contracts: {declared} kept, 0 broken" in result.stdout, result.stdout


def test_domain_imports_without_third_party_packages() -> None:
    code = (
        "import sys; import tinkerd.domain.ops, tinkerd.domain.errors; "
        "bad = [m for m in ('torch', 'numpy', 'pydantic', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
