"""The HTTP API: FastAPI routes speaking the Tinker wire protocol, over the store. Never imports torch or the engine."""

from tinkerd.api.app import API_PREFIX, create_app
from tinkerd.api.auth import load_keys_file
from tinkerd.api.context import ApiSettings, ServedModelInfo
from tinkerd.api.dispatch import Dispatch, InProcess, ThroughLedger
from tinkerd.api.notify import FutureNotifier

__all__ = [
    "API_PREFIX",
    "ApiSettings",
    "Dispatch",
    "FutureNotifier",
    "InProcess",
    "ServedModelInfo",
    "ThroughLedger",
    "create_app",
    "load_keys_file",
]
