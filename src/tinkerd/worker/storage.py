"""Where checkpoint files live; the layout is shared with the API (downloads, deletes), so it lives in the store."""

from tinkerd.store.files import CheckpointFiles

__all__ = ["CheckpointFiles"]
