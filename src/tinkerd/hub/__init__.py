"""Fetching, converting and finding the base models tinkerd serves.

Importing this package is cheap: torch and transformers load only when a model is actually converted.
"""

from tinkerd.hub.catalog import (
    CATALOG,
    DEFAULT_MODEL,
    CatalogEntry,
    PulledModel,
    ResolvedModel,
    list_models,
    resolve_model,
)
from tinkerd.hub.layout import hf_home, model_dir, models_root
from tinkerd.hub.pull import PullResult, pull

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "CatalogEntry",
    "PullResult",
    "PulledModel",
    "ResolvedModel",
    "hf_home",
    "list_models",
    "model_dir",
    "models_root",
    "pull",
    "resolve_model",
]
