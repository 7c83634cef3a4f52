"""The checkpoint storage seam: locations a role may be given, and the directory implementation behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinkerd.domain.errors import NotFoundError, SettingsError
from tinkerd.domain.paths import TinkerPath
from tinkerd.store.storage import CheckpointStorage, open_storage, storage_directory


def test_a_directory_or_file_url_is_a_directory(tmp_path: Path) -> None:
    assert storage_directory(tmp_path) == tmp_path
    assert storage_directory(f"file://{tmp_path}") == tmp_path


def test_a_scheme_without_an_implementation_is_named() -> None:
    with pytest.raises(SettingsError, match=r"'s3://bucket/ckpt': s3:// storage is not built in yet.*mount"):
        storage_directory("s3://bucket/ckpt")


def test_a_checkpoint_written_and_published_is_read_listed_and_deleted(tmp_path: Path) -> None:
    storage: CheckpointStorage = open_storage(tmp_path)
    path = TinkerPath("run-1", "weights", "step-1")
    with pytest.raises(NotFoundError):
        storage.list_files(path)
    target = storage.write_dir(path)
    target.mkdir(parents=True)
    (target / "adapter_model.safetensors").write_bytes(b"12345")
    storage.published(path)
    assert (storage.read_dir(path) / "adapter_model.safetensors").read_bytes() == b"12345"
    assert [(f.relpath, f.size_bytes) for f in storage.list_files(path)] == [("adapter_model.safetensors", 5)]
    assert storage.file_of(path, "adapter_model.safetensors").read_bytes() == b"12345"
    assert storage.snapshot_read_dir("s1:sample:0") is None
    shared = storage.snapshot_write_dir("s1:sample:0")
    shared.mkdir(parents=True)
    storage.snapshot_published("s1:sample:0")
    assert storage.snapshot_read_dir("s1:sample:0") == shared
    storage.delete(path)
    with pytest.raises(NotFoundError):
        storage.list_files(path)
