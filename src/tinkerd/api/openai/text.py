"""Text <-> tokens for the OpenAI front end, in the api process: the model's own ``tokenizer.json`` (the Rust
``tokenizers`` library) and its own chat template (Jinja, rendered the way Hugging Face renders it), without torch
or transformers.

Chat templates are Jinja programs written for Hugging Face's renderer; this one gives them the same surroundings:
a sandboxed environment with ``trim_blocks``/``lstrip_blocks`` and loop controls, a ``tojson`` filter that keeps
non-ASCII characters, ``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens as variables
(``bos_token``, ``eos_token``, ...). ``tests/api/openai/test_text.py`` checks it against ``apply_chat_template``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from tinkerd.domain.errors import InvalidRequestError, NotFoundError

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(InvalidRequestError):
    """The chat template refused the messages (it called ``raise_exception``, or failed on them)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the messages: {message}")


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken-like {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _read_template(directory: Path, config: Mapping[str, object]) -> str | None:
    """The chat template: ``chat_template.jinja`` (newer layout) or tokenizer_config.json's ``chat_template``
    (a string, or a list of named templates of which "default" is the one to use)."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    raw = config.get("chat_template")
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        named = {str(item.get("name")): str(item.get("template")) for item in raw if isinstance(item, Mapping)}
        return named.get("default")
    return None


class TextCodec:
    """One model's tokenizer and chat template. Thread-safe for encode/decode (the Rust tokenizer is)."""

    def __init__(self, directory: Path) -> None:
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise NotFoundError(f"no tokenizer.json in {directory}: this model cannot take text over the OpenAI API")
        self.tokenizer = Tokenizer.from_file(str(file))
        config_file = directory / "tokenizer_config.json"
        config: dict[str, object] = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        self.special_tokens = {
            key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key))) is not None
        }
        self.chat_template = _read_template(directory, config)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, tokens: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def token_text(self, token: int) -> str:
        """One token as text on its own (what OpenAI's logprobs list as ``token``); special tokens included."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(id_ for id_, added in self.tokenizer.get_added_tokens_decoder().items() if added.special)

    def render_chat(self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, object]] | None = None) -> str:  # fmt: skip
        """The prompt text the model's chat template makes of `messages`; InvalidRequestError when the model has no
        template or the template refuses them."""
        if self.chat_template is None:
            raise InvalidRequestError(
                "this model's tokenizer has no chat template: use /v1/completions with a prompt instead"
            )
        template = self._compiled
        try:
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                tools=list(tools) if tools else None,
                documents=None,
                **self.special_tokens,
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
            raise TemplateError(f"the model's chat template failed on these messages: {error}") from None

    @cached_property
    def _compiled(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        assert self.chat_template is not None
        return env.from_string(self.chat_template)


class TextCodecs:
    """One ``TextCodec`` per tokenizer directory, loaded on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codecs: dict[Path, TextCodec] = {}

    def get(self, directory: Path) -> TextCodec:
        with self._lock:
            codec = self._codecs.get(directory)
            if codec is None:
                codec = self._codecs[directory] = TextCodec(directory)
            return codec
