"""A role started with a database, storage or model it cannot use fails at once, naming the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg_server import free_port
from tinkerd.roles.settings import check_storage, open_ledger
from tinkerd.settings import SettingsError


def test_an_unreachable_database_is_named() -> None:
    url = f"postgresql://tinkerd:secret@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(
        SettingsError, match=r"cannot open the database at postgresql://tinkerd:\*\*\*@.*refused"
    ) as err:
        open_ledger(url)
    assert "secret" not in str(err.value)


def test_a_malformed_database_url_is_named() -> None:
    with pytest.raises(SettingsError, match="bad database URL 'not a url'"):
        open_ledger("not a url")


def test_unusable_storage_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SettingsError, match=r"checkpoint storage .*file/storage is not usable"):
        check_storage(blocker / "storage")
    assert check_storage(tmp_path / "new").is_dir()


@pytest.mark.heavy  # a `tinkerd trainer` subprocess: seconds of torch import
def test_a_trainer_with_a_model_it_cannot_find_exits_with_the_reason(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-c", "from tinkerd.cli import main; main()", "trainer",
            "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}", "--storage", str(tmp_path / "storage"),
            "--model", str(tmp_path / "no-such-model"), "--cache-dir", str(tmp_path / "cache"),
        ],
        capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "no-such-model" in done.stderr and "error:" in done.stderr


def test_an_object_store_url_for_storage_is_refused_with_advice(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-c", "from tinkerd.cli import main; main()", "api",
            "--database-url", f"sqlite:///{tmp_path / 'db.sqlite'}", "--storage", "s3://bucket/checkpoints",
        ],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "s3:// storage is not built in yet" in done.stderr and "mount" in done.stderr
