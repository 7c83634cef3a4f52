"""Text <-> tokens for the sampling playground, with each served model's own tokenizer and chat template.

transformers is imported on first use only (the console starts without it), and each tokenizer is loaded once.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinkerd.domain.errors import InvalidRequestError, NotFoundError

MAX_TEXT_CHARS = 200_000


class Tokenizers:
    def __init__(self, directories: Mapping[str, Path]) -> None:
        self._directories = directories  # may be computed on lookup (the split api role finds them on its host)
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _get(self, model: str) -> Any:
        with self._lock:
            if model not in self._loaded:
                directory = self._directories.get(model)
                if directory is None:
                    served = ", ".join(sorted(self._directories)) or "none"
                    raise NotFoundError(f"no tokenizer for model {model!r}; models with one: {served}")
                from transformers import AutoTokenizer

                self._loaded[model] = AutoTokenizer.from_pretrained(str(directory))
            return self._loaded[model]

    def encode_text(self, model: str, text: str) -> list[int]:
        _check_length(text)
        return list(self._get(model).encode(text, add_special_tokens=True))

    def encode_chat(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the model's chat template, ready for the assistant's turn."""
        tokenizer = self._get(model)
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {model!r} has no chat template; send raw text instead")
        for message in messages:
            _check_length(message["content"])
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # newer transformers answer a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def pieces(self, model: str, tokens: list[int]) -> list[str]:
        """Each token's text on its own (as the tokenizer decodes it), for showing tokens one by one."""
        tokenizer = self._get(model)
        vocab = int(getattr(tokenizer, "vocab_size", 0)) + len(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        bad = [t for t in tokens if t < 0 or (vocab and t >= max(vocab, len(tokenizer)))]
        if bad:
            raise InvalidRequestError(f"token ids out of the vocabulary: {bad[:5]}")
        return [tokenizer.decode([t]) for t in tokens]


def _check_length(text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequestError(f"text of {len(text)} characters; at most {MAX_TEXT_CHARS} are tokenized here")
