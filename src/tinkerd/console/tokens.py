"""Text <-> tokens for the sampling playground, with each served model's own tokenizer and chat template.

The OpenAI front end's ``TextCodec`` does the work: the Rust tokenizers library and Jinja, no transformers and no
torch, so the api role of a split deployment serves the playground without them. Each tokenizer loads once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tinkerd.api.openai.text import TextCodec, TextCodecs
from tinkerd.domain.errors import InvalidRequestError, NotFoundError

MAX_TEXT_CHARS = 200_000


class Tokenizers:
    def __init__(self, directories: Mapping[str, Path]) -> None:
        self._directories = directories  # may be computed on lookup (the split api role finds them on its host)
        self._codecs = TextCodecs()

    def _get(self, model: str) -> TextCodec:
        directory = self._directories.get(model)
        if directory is None:
            served = ", ".join(sorted(self._directories)) or "none"
            raise NotFoundError(f"no tokenizer for model {model!r}; models with one: {served}")
        return self._codecs.get(directory)

    def encode_text(self, model: str, text: str) -> list[int]:
        _check_length(text)
        return self._get(model).encode(text, add_special_tokens=True)

    def encode_chat(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the model's chat template, ready for the assistant's turn (the rendered text is
        tokenized without adding special tokens again, as ``apply_chat_template`` does)."""
        codec = self._get(model)
        if codec.chat_template is None:
            raise InvalidRequestError(f"model {model!r} has no chat template; send raw text instead")
        for message in messages:
            _check_length(message["content"])
        return codec.encode(codec.render_chat(messages, add_generation_prompt=True), add_special_tokens=False)

    def pieces(self, model: str, tokens: list[int]) -> list[str]:
        """Each token's text on its own (special tokens included), for showing tokens one by one."""
        codec = self._get(model)
        vocab = codec.tokenizer.get_vocab_size(with_added_tokens=True)
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids out of the vocabulary: {bad[:5]}")
        return [codec.token_text(t) for t in tokens]


def _check_length(text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequestError(f"text of {len(text)} characters; at most {MAX_TEXT_CHARS} are tokenized here")
