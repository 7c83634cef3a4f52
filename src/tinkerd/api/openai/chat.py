"""``POST /v1/chat/completions``: the messages through the model's own chat template, sampled with the adapter of
``model``; an answer, or server-sent events when ``stream`` is set."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tinkerd.api.context import ApiContext
from tinkerd.api.openai import render
from tinkerd.api.openai.checks import refuse_unsupported
from tinkerd.api.openai.errors import OpenAIError, error_response
from tinkerd.api.openai.models import Target, resolve
from tinkerd.api.openai.render import Output
from tinkerd.api.openai.sampling import (
    Disconnected,
    Options,
    build_sample,
    check_max_tokens,
    check_options,
    keepalive,
    run_sample,
    top_alternatives,
)
from tinkerd.api.openai.schemas import ChatCompletionRequest, ChatMessage
from tinkerd.api.openai.streaming import IncrementalText, text_deltas
from tinkerd.api.openai.text import TextCodec, TextCodecs
from tinkerd.api.submit import in_thread
from tinkerd.domain.ops import SampleResult
from tinkerd.domain.requests import Sample

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Prepared:
    target: Target
    codec: TextCodec
    prompt: list[int]
    options: Options
    sample: Sample
    logprobs: bool
    top_logprobs: int


def codec_for(codecs: TextCodecs, target: Target) -> TextCodec:
    if target.base.tokenizer_dir is None:
        raise OpenAIError(f"base model {target.base.name!r} is served without a tokenizer.json: it cannot take text")
    return codecs.get(Path(target.base.tokenizer_dir))


def _template_message(message: ChatMessage, index: int) -> dict[str, object]:
    if isinstance(message.content, list):
        texts: list[str] = []
        for part in message.content:
            if part.type != "text" or part.text is None:
                raise OpenAIError(
                    f"messages[{index}] has a {part.type!r} content part; tinkerd serves text models only",
                    param=f"messages[{index}].content",
                )
            texts.append(part.text)
        content = "".join(texts)
    else:
        content = message.content or ""
    # Templates know system, user and assistant; OpenAI's newer "developer" role is the system prompt.
    role = "system" if message.role == "developer" else message.role
    out: dict[str, object] = {"role": role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    return out


def prepare(ctx: ApiContext, codecs: TextCodecs, owner: str, body: ChatCompletionRequest) -> Prepared:
    """Everything checked and tokenized before anything is submitted (blocking: run it in a thread)."""
    refuse_unsupported(body)
    if body.tools:
        raise OpenAIError("tools (function calling) are not supported by tinkerd", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise OpenAIError("only response_format {'type': 'text'} is supported by tinkerd", param="response_format")
    options = check_options(body)
    top = body.top_logprobs or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise OpenAIError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top}", param="top_logprobs")
    if top and not body.logprobs:
        raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
    target = resolve(ctx, owner, body.model)
    codec = codec_for(codecs, target)
    messages = [_template_message(message, i) for i, message in enumerate(body.messages)]
    text = codec.render_chat(messages, add_generation_prompt=body.add_generation_prompt is not False)
    prompt = codec.encode(text, add_special_tokens=False)  # the template writes any special tokens itself
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = check_max_tokens(asked, len(prompt), target.base.max_context_length, param=param)
    sample = build_sample(target, prompt, options, max_tokens)
    return Prepared(target, codec, prompt, options, sample, bool(body.logprobs), top)


async def _generate(
    ctx: ApiContext, owner: str, prepared: Prepared, disconnected: Disconnected | None
) -> tuple[list[Output], list[dict[str, object] | None]]:
    """The choices' outputs and their ``logprobs`` objects (None where not asked for)."""
    result = await run_sample(ctx, owner, prepared.sample, disconnected)
    stop_ids = prepared.target.base.eos_token_ids
    outputs = [render.output_of(prepared.codec, s, stop_ids, prepared.options.stop) for s in result.sequences]
    if not prepared.logprobs:
        return outputs, [None] * len(outputs)
    tops: list[list[list[tuple[int, float]]]] | list[None] = [None] * len(outputs)
    if prepared.top_logprobs:
        tops = await top_alternatives(
            ctx, owner, prepared.target, prepared.prompt, [o.tokens for o in outputs], prepared.top_logprobs,
            disconnected,
        )  # fmt: skip
    logprobs = [
        render.chat_logprobs(prepared.codec, o.tokens, o.logprobs, top) for o, top in zip(outputs, tops, strict=True)
    ]
    return outputs, list(logprobs)


async def chat_completions(
    http: Request, ctx: ApiContext, codecs: TextCodecs, owner: str, body: ChatCompletionRequest
) -> Response:
    prepared = await in_thread(prepare, ctx, codecs, owner, body)
    completion_id, created = render.new_id("chatcmpl"), render.now()
    head = {"id": completion_id, "created": created, "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(ctx, owner, prepared, head, include_usage), media_type="text/event-stream")
    outputs, logprobs = await _generate(ctx, owner, prepared, http.is_disconnected)
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o.text},
            "logprobs": lp,
            "finish_reason": o.finish_reason,
        }
        for i, (o, lp) in enumerate(zip(outputs, logprobs, strict=True))
    ]
    used = render.usage(len(prepared.prompt), sum(o.generated for o in outputs))
    return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": used})


async def _stream(
    ctx: ApiContext, owner: str, prepared: Prepared, head: dict[str, object], include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """Each choice's role at once, then its text as it is sampled (all at the end when logprobs are asked for, or
    when the worker runs in another process), then its finish; usage rides on the last finish chunk (and in a chunk
    of its own when ``stream_options.include_usage`` asks, as OpenAI sends it). Closing the stream cancels the
    request, which frees its sequences in the sampler."""
    chunk = {**head, "object": "chat.completion.chunk"}
    n = prepared.options.n
    for i in range(n):
        yield render.sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]})
    texts = [IncrementalText(prepared.codec, prepared.options.stop) for _ in range(n)]
    try:
        if prepared.logprobs:
            task = asyncio.ensure_future(_generate(ctx, owner, prepared, None))
            async with contextlib.aclosing(keepalive(task)) as comments:
                async for comment in comments:
                    yield comment
            outputs, logprobs = task.result()
        else:
            result: SampleResult | None = None
            async with contextlib.aclosing(text_deltas(ctx, owner, prepared.sample, texts)) as events:
                async for item in events:
                    if isinstance(item, bytes):
                        yield item
                    elif isinstance(item, SampleResult):
                        result = item
                    else:
                        index, text = item
                        yield render.sse({**chunk, "choices": [{"index": index, "delta": {"content": text}}]})
            assert result is not None
            stop_ids = prepared.target.base.eos_token_ids
            outputs = [render.output_of(prepared.codec, s, stop_ids, prepared.options.stop) for s in result.sequences]
            logprobs = [None] * len(outputs)
    except Exception as exc:  # the stream has started: the error goes in an event
        response = error_response(exc)
        yield render.sse_error(response.status_code, bytes(response.body))
        return
    used = render.usage(len(prepared.prompt), sum(o.generated for o in outputs))
    for i, (o, lp) in enumerate(zip(outputs, logprobs, strict=True)):
        rest = texts[i].finish(o.text)
        if rest or lp is not None:
            delta = {"index": i, "delta": {"content": rest}, "logprobs": lp, "finish_reason": None}
            yield render.sse({**chunk, "choices": [delta]})
        finish: dict[str, object] = {**chunk, "choices": [{"index": i, "delta": {}, "finish_reason": o.finish_reason}]}
        if i == len(outputs) - 1:
            finish["usage"] = used
        yield render.sse(finish)
    if include_usage:
        yield render.sse({**chunk, "choices": [], "usage": used})
    yield render.DONE
