"""Where checkpoint files live: ``<data_dir>/checkpoints/<run_id>/<kind>/<name>/``, kind one of the CheckpointKinds.

The worker writes these directories; the API reads them for downloads and removes them when their owner deletes a
checkpoint. Every directory is derived from a ``TinkerPath``, whose construction validates each segment (no '/', no
'..', no leading '.'), so no user-chosen name can address anything outside the checkpoints root; files inside a
checkpoint are addressed by a relative path that ``file_of`` checks the same way.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tinkerd.domain.errors import NotFoundError
from tinkerd.domain.ids import validate_sampler_id
from tinkerd.domain.paths import TinkerPath


@dataclass(frozen=True)
class StoredFile:
    relpath: str  # '/'-separated, relative to the checkpoint directory
    size_bytes: int
    modified: float  # POSIX time


class CheckpointFiles:
    """Checkpoint storage in a directory (store.storage.CheckpointStorage): reading and writing are in place."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).absolute() / "checkpoints"

    def write_dir(self, path: TinkerPath) -> Path:
        return self.dir_of(path)

    def published(self, path: TinkerPath) -> None:
        pass  # written in place, atomically (engine.atomic_dir): every role already sees it

    def read_dir(self, path: TinkerPath) -> Path:
        return self.dir_of(path)

    def snapshot_write_dir(self, sampler_id: str) -> Path:
        return self.snapshot_dir(sampler_id)

    def snapshot_published(self, sampler_id: str) -> None:
        pass

    def snapshot_read_dir(self, sampler_id: str) -> Path | None:
        directory = self.snapshot_dir(sampler_id)
        return directory if directory.is_dir() else None

    def dir_of(self, path: TinkerPath) -> Path:
        run_id, kind, name = path.parts()  # a TinkerPath validates its segments on construction
        directory = self.root / run_id / kind / name
        # Belt and braces: the segments are validated, but a symlinked run directory must not lead elsewhere either.
        if not directory.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"checkpoint directory of {path} escapes the checkpoints root")
        return directory

    def snapshot_dir(self, sampler_id: str) -> Path:
        """Where a trainer of a split deployment leaves the weights of a save_weights_and_get_sampling_client
        snapshot, for a sampler in another process (never listed as a checkpoint)."""
        safe = validate_sampler_id(sampler_id).replace(":", "_")
        directory = self.root.parent / "snapshots" / safe
        if not directory.resolve().is_relative_to(self.root.parent.resolve()):
            raise ValueError(f"snapshot directory of {sampler_id!r} escapes the data directory")
        return directory

    def list_files(self, path: TinkerPath) -> list[StoredFile]:
        """The regular files of a checkpoint, sorted by relative path; symlinks and hidden entries are skipped.

        NotFoundError when the checkpoint has no directory (never saved here, or deleted)."""
        directory = self.dir_of(path)
        if directory.is_symlink() or not directory.is_dir():
            raise NotFoundError(f"checkpoint {path} has no files on this server")
        found: list[StoredFile] = []
        for parent, dirs, names in os.walk(directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (Path(parent) / d).is_symlink())
            for name in names:
                if name.startswith("."):
                    continue
                info = (Path(parent) / name).lstat()
                if stat.S_ISREG(info.st_mode):
                    relpath = (Path(parent) / name).relative_to(directory).as_posix()
                    found.append(StoredFile(relpath, info.st_size, info.st_mtime))
        return sorted(found, key=lambda f: f.relpath)

    def file_of(self, path: TinkerPath, relpath: str) -> Path:
        """The regular file at ``relpath`` inside a checkpoint, or NotFoundError (also for anything that would climb
        out of it: absolute paths, '..', hidden segments, symlinks)."""
        parts = PurePosixPath(relpath).parts
        if not parts or relpath.startswith("/") or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise NotFoundError(f"no file {relpath!r} in checkpoint {path}")
        directory = self.dir_of(path)
        candidate = directory.joinpath(*parts)
        try:
            info = candidate.lstat()
        except OSError:
            raise NotFoundError(f"no file {relpath!r} in checkpoint {path}") from None
        if not stat.S_ISREG(info.st_mode) or not candidate.resolve().is_relative_to(directory.resolve()):
            raise NotFoundError(f"no file {relpath!r} in checkpoint {path}")
        return candidate

    def delete(self, path: TinkerPath, *, prune: bool = True) -> None:
        """Remove a checkpoint's files and, with `prune`, its run's directories once they are empty. Missing files
        are fine.

        The directory is first renamed to a hidden sibling (one atomic step), so that a reader finds the whole
        checkpoint or none of it; a download that already opened a file reads it to the end. Pruning races a save
        into the same run that has just made its directories, so only the worker's own thread prunes."""
        directory = self.dir_of(path)
        if directory.is_symlink():
            directory.unlink()
        else:
            # Named like an in-flight save's side directory, so a removal cut short by a crash is swept by the next
            # save beside it (engine.atomic_dir) rather than left forever.
            doomed = directory.parent / f".{directory.name}.tinkerd-tmp-{uuid.uuid4().hex}"
            try:
                directory.rename(doomed)
            except FileNotFoundError:
                doomed = directory  # nothing to move; rmtree below ignores its absence
            shutil.rmtree(doomed, ignore_errors=True)
        for parent in (directory.parent, directory.parent.parent) if prune else ():
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or already gone): keep it
