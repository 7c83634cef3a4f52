"""Where checkpoint files live: ``<data_dir>/checkpoints/<run_id>/<weights|sampler_weights>/<name>/``.

Every directory is derived from a ``TinkerPath``, whose construction validates each segment (no '/', no '..', no
leading '.'), so no user-chosen name can address anything outside the checkpoints root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tinkerd.domain.paths import TinkerPath


class CheckpointFiles:
    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).absolute() / "checkpoints"

    def dir_of(self, path: TinkerPath) -> Path:
        run_id, kind, name = path.parts()  # a TinkerPath validates its segments on construction
        directory = self.root / run_id / kind / name
        # Belt and braces: the segments are validated, but a symlinked run directory must not lead elsewhere either.
        if not directory.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"checkpoint directory of {path} escapes the checkpoints root")
        return directory

    def delete(self, path: TinkerPath) -> None:
        """Remove a checkpoint's files, and its run's directories once they are empty. Missing files are fine."""
        directory = self.dir_of(path)
        if directory.is_symlink():
            directory.unlink()
        else:
            shutil.rmtree(directory, ignore_errors=True)
        for parent in (directory.parent, directory.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or already gone): keep it
