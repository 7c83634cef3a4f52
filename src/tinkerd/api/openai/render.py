"""Sampler results as OpenAI answers: the text of each choice (stop token and stop string cut off, as OpenAI
does), logprobs in the chat and the legacy completions shapes, usage, and server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from tinkerd.api.openai.text import TextCodec
from tinkerd.domain.ops import SampledSequence

TopK = list[tuple[int, float]]
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Output:
    """One choice: its text and the tokens it consists of (with their logprobs, as the sampler reported them)."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    generated: int  # tokens the sampler generated (the stop token included): what usage counts


def output_of(codec: TextCodec, sequence: SampledSequence, stop_ids: Sequence[int], stops: Sequence[str]) -> Output:
    tokens, logprobs = list(sequence.tokens), list(sequence.logprobs)
    finish = "length" if sequence.stop_reason == "length" else "stop"
    if finish == "stop" and tokens and tokens[-1] in stop_ids:
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    text = codec.decode(tokens)
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    return Output(text, tokens, logprobs, finish, len(sequence.tokens))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# -- chat logprobs ----------------------------------------------------------------------------------------------------


def _token_json(codec: TextCodec, token: int, logprob: float) -> dict[str, object]:
    text = codec.token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    codec: TextCodec, tokens: Sequence[int], logprobs: Sequence[float], top: Sequence[TopK] | None
) -> dict[str, object]:
    """``choices[i].logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content: list[dict[str, object]] = []
    for i, (token, logprob) in enumerate(zip(tokens, logprobs, strict=True)):
        entry = _token_json(codec, token, logprob)
        alternatives = top[i] if top is not None and i < len(top) else []
        entry["top_logprobs"] = [_token_json(codec, t, lp) for t, lp in alternatives]
        content.append(entry)
    return {"content": content}


# -- legacy completions logprobs --------------------------------------------------------------------------------------


def completion_logprobs(
    codec: TextCodec,
    tokens: Sequence[int],
    logprobs: Sequence[float | None],
    top: Sequence[TopK | None] | None,
    offset: int = 0,
) -> dict[str, object]:
    """``choices[i].logprobs``: ``{tokens, token_logprobs, top_logprobs, text_offset}`` (one entry per token;
    ``top_logprobs`` maps token text to logprob, or is None for a position with none, like a prompt's first)."""
    texts = [codec.token_text(t) for t in tokens]
    offsets: list[int] = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    tops: list[dict[str, float] | None] | None = None
    if top is not None:
        tops = []
        for i in range(len(tokens)):
            pairs = top[i] if i < len(top) else None
            tops.append(None if pairs is None else {codec.token_text(t): lp for t, lp in pairs})
    return {"tokens": texts, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


# -- server-sent events -----------------------------------------------------------------------------------------------


def sse(event: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n"


def sse_error(status: int, body: bytes) -> bytes:
    """An error after the stream started: the ``openai`` client raises an APIError for an event with "error"."""
    del status  # already answered 200; the body carries the error
    return b"data: " + body + b"\n\n"
