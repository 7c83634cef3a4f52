"""The checkpoint storage seam: what every role needs from the place checkpoints live.

Today's implementation is a directory (`store.files.CheckpointFiles`): the data directory of `tinkerd serve`, or a
directory every role of a split deployment mounts at the same path (NFS, a cluster file system, a bucket mounted
with s3fs or mountpoint-s3). An S3-compatible object store can be added as a second implementation of
`CheckpointStorage` without touching the engine, the worker or the api:

- the engine reads and writes checkpoints as local directories, so `write_dir` hands out a local staging directory
  and `published` uploads it (objects under `<run>/<kind>/<name>/`, a marker object written last, so a reader sees
  a whole checkpoint or none); `read_dir` downloads into a local cache, keyed by the checkpoint's creation time as
  the worker's weights cache already is;
- `list_files` lists the objects; `file_of` serves downloads from the local cache (or the api redirects to a
  presigned URL: the download routes' signed links already separate "may read" from "where the bytes are");
- snapshots for samplers are the same, under `snapshots/<sampler id>/`.

`open_storage` turns the location a role is given into an implementation, and names what it cannot open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tinkerd.domain.errors import SettingsError
from tinkerd.domain.paths import TinkerPath
from tinkerd.store.files import CheckpointFiles, StoredFile

__all__ = ["CheckpointStorage", "StoredFile", "open_storage", "storage_directory"]


class CheckpointStorage(Protocol):
    def write_dir(self, path: TinkerPath) -> Path:
        """A local directory to write the checkpoint `path` into (atomically: engine.atomic_dir), then `published`."""
        ...

    def published(self, path: TinkerPath) -> None:
        """The checkpoint written into `write_dir(path)` is complete: make it readable by every role."""
        ...

    def read_dir(self, path: TinkerPath) -> Path:
        """A local directory holding the checkpoint's files (it may not exist: the loader then fails, naming it)."""
        ...

    def snapshot_write_dir(self, sampler_id: str) -> Path:
        """Where a trainer writes the weights of a save_weights_and_get_sampling_client snapshot for samplers in
        other processes (then `snapshot_published`); never listed as a checkpoint."""
        ...

    def snapshot_published(self, sampler_id: str) -> None: ...

    def snapshot_read_dir(self, sampler_id: str) -> Path | None:
        """A local directory with the snapshot's weights, or None when no trainer shared one."""
        ...

    def list_files(self, path: TinkerPath) -> list[StoredFile]:
        """The checkpoint's files, sorted by relative path; NotFoundError when it has none."""
        ...

    def file_of(self, path: TinkerPath, relpath: str) -> Path:
        """One file of the checkpoint as a local path, or NotFoundError (also for paths that would climb out)."""
        ...

    def delete(self, path: TinkerPath, *, prune: bool = True) -> None:
        """Remove the checkpoint's files; missing files are fine."""
        ...


def storage_directory(location: str | Path) -> Path:
    """The directory a storage location names: a path, or a file:// URL.

    Raises SettingsError for a URL of another scheme (none has an implementation yet)."""
    text = str(location)
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme == "file":
        return Path(text.split("://", 1)[1])
    if scheme:
        raise SettingsError(
            f"checkpoint storage {text!r}: {scheme}:// storage is not built in yet (store/storage.py says how to add "
            "it); mount the bucket or share as a directory on every host (s3fs, mountpoint-s3, NFS) and pass that"
        )
    return Path(text)


def open_storage(location: str | Path) -> CheckpointStorage:
    """The storage at `location` (see `storage_directory`): today always a directory."""
    return CheckpointFiles(storage_directory(location))
