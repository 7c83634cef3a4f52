"""The OpenAI-compatible front end (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) over the same
sampler, ledger, keys and checkpoints as the Tinker API. Its own wire schemas: it never imports the Tinker ones."""

from tinkerd.api.openai.routes import install

__all__ = ["install"]
