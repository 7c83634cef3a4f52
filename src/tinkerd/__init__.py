"""tinkerd: a self-hosted server for the Tinker fine-tuning API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tinkerd.server import running

__all__ = ["__version__", "running"]


def __getattr__(name: str) -> Any:
    # Lazy: `import tinkerd` must stay light (no FastAPI, no torch) for the CLI and the domain layer.
    if name == "running":
        from tinkerd.server import running

        return running
    raise AttributeError(f"module 'tinkerd' has no attribute {name!r}")
