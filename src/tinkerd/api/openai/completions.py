"""``POST /v1/completions``: raw prompts (text or token ids, one or many), sampled with the adapter of ``model``.

``echo`` returns the prompt ahead of the completion and, with ``logprobs``, the prompt tokens' logprobs (the first
is null); ``max_tokens: 0`` with ``echo`` only scores the prompt, which is what evaluation harnesses ask for
(log-likelihoods of a continuation).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tinkerd.api.context import ApiContext
from tinkerd.api.openai import render
from tinkerd.api.openai.chat import codec_for
from tinkerd.api.openai.checks import refuse_unsupported
from tinkerd.api.openai.errors import OpenAIError, error_response
from tinkerd.api.openai.models import Target, resolve
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
from tinkerd.api.openai.schemas import CompletionRequest
from tinkerd.api.openai.streaming import IncrementalText, text_deltas
from tinkerd.api.openai.text import TextCodec, TextCodecs
from tinkerd.api.submit import in_thread
from tinkerd.domain.ops import SampleResult

MAX_LOGPROBS = 20
MAX_PROMPTS = 256


@dataclass(frozen=True)
class Prepared:
    target: Target
    codec: TextCodec
    prompts: list[list[int]]
    prompt_texts: list[str]
    options: Options
    max_tokens: int  # as asked: 0 scores the prompt only (echo)
    logprobs: int | None
    echo: bool


def _prompts(codec: TextCodec, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        return [codec.encode(prompt, add_special_tokens=True)]
    if not prompt:
        raise OpenAIError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [[int(t) for t in prompt]]  # type: ignore[arg-type]
    out: list[list[int]] = []
    for p in prompt:
        if isinstance(p, str):
            out.append(codec.encode(p, add_special_tokens=True))
        elif isinstance(p, list):
            out.append([int(t) for t in p])
        else:
            raise OpenAIError("prompt must be a string, a list of strings, or token ids", param="prompt")
    return out


def prepare(ctx: ApiContext, codecs: TextCodecs, owner: str, body: CompletionRequest) -> Prepared:
    refuse_unsupported(body)
    if body.suffix:
        raise OpenAIError("suffix is not supported by tinkerd", param="suffix")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise OpenAIError("best_of is not supported by tinkerd; leave it unset or equal to n", param="best_of")
    options = check_options(body)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise OpenAIError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}", param="logprobs")
    target = resolve(ctx, owner, body.model)
    codec = codec_for(codecs, target)
    prompts = _prompts(codec, body.prompt)
    if len(prompts) > MAX_PROMPTS:
        raise OpenAIError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    vocab = target.base.vocab_size
    for i, tokens in enumerate(prompts):
        if not tokens:
            raise OpenAIError(f"prompt {i} is empty", param="prompt")
        if any(not 0 <= t < vocab for t in tokens):
            raise OpenAIError(f"prompt {i} holds a token id outside the vocabulary [0, {vocab})", param="prompt")
    echo = bool(body.echo)
    context = target.base.max_context_length
    longest = max(len(p) for p in prompts)
    max_tokens = check_max_tokens(body.max_tokens, longest, context, param="max_tokens", minimum=0 if echo else 1)
    if body.max_tokens is None:
        max_tokens = 16
    texts = [codec.decode(p) if echo else "" for p in prompts]
    return Prepared(target, codec, prompts, texts, options, max_tokens, body.logprobs, echo)


@dataclass(frozen=True)
class Choice:
    text: str
    logprobs: dict[str, object] | None
    finish_reason: str
    generated: int


async def _one_prompt(
    ctx: ApiContext, owner: str, p: Prepared, index: int, disconnected: Disconnected | None
) -> list[Choice]:
    prompt = p.prompts[index]
    k = p.logprobs
    score_prompt = p.echo and k is not None
    sample = build_sample(
        p.target, prompt, p.options, max(1, p.max_tokens), prompt_logprobs=score_prompt,
        topk_prompt_logprobs=k or 0 if score_prompt else 0,
    )  # fmt: skip
    result: SampleResult = await run_sample(ctx, owner, sample, disconnected)
    stop_ids = p.target.base.eos_token_ids
    outputs = [render.output_of(p.codec, s, stop_ids, p.options.stop) for s in result.sequences]
    if p.max_tokens == 0:  # scoring only: the one token sampled to get there is not part of the answer
        outputs = [render.Output("", [], [], "length", 0) for _ in outputs]
    tops: list[list[list[tuple[int, float]]]] | None = None
    if k:
        tops = await top_alternatives(ctx, owner, p.target, prompt, [o.tokens for o in outputs], k, disconnected)
    choices: list[Choice] = []
    for j, o in enumerate(outputs):
        logprobs = None
        if k is not None:
            tokens: list[int] = list(o.tokens)
            values: list[float | None] = list(o.logprobs)
            top: list[list[tuple[int, float]] | None] | None = list(tops[j]) if tops is not None else None
            if p.echo:
                tokens = prompt + tokens
                values = list(result.prompt_logprobs or [None] * len(prompt)) + values
                if top is not None:
                    top = list(result.topk_prompt_logprobs or [None] * len(prompt)) + top
            logprobs = render.completion_logprobs(p.codec, tokens, values, top)
        choices.append(Choice(p.prompt_texts[index] + o.text, logprobs, o.finish_reason, o.generated))
    return choices


async def _generate(ctx: ApiContext, owner: str, p: Prepared, disconnected: Disconnected | None) -> list[Choice]:
    per_prompt = await asyncio.gather(*(_one_prompt(ctx, owner, p, i, disconnected) for i in range(len(p.prompts))))
    return [choice for choices in per_prompt for choice in choices]


async def completions(
    http: Request, ctx: ApiContext, codecs: TextCodecs, owner: str, body: CompletionRequest
) -> Response:
    prepared = await in_thread(prepare, ctx, codecs, owner, body)
    head = {"id": render.new_id("cmpl"), "created": render.now(), "model": body.model}
    prompt_tokens = sum(len(p) for p in prepared.prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(ctx, owner, prepared, head, prompt_tokens, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")
    choices = await _generate(ctx, owner, prepared, http.is_disconnected)
    body_json = {
        **head,
        "object": "text_completion",
        "choices": [
            {"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for i, c in enumerate(choices)
        ],
        "usage": render.usage(prompt_tokens, sum(c.generated for c in choices)),
    }
    return JSONResponse(body_json)


async def _stream(
    ctx: ApiContext, owner: str, p: Prepared, head: dict[str, object], prompt_tokens: int, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    """Text as it is sampled for one prompt without logprobs or echo; otherwise all at the end."""
    chunk = {**head, "object": "text_completion"}
    yield b": tinkerd is sampling\n\n"  # a comment: the stream is open (closing it cancels the request)
    live = len(p.prompts) == 1 and p.logprobs is None and not p.echo
    texts = [IncrementalText(p.codec, p.options.stop) for _ in range(p.options.n)]
    try:
        if live:
            result: SampleResult | None = None
            sample = build_sample(p.target, p.prompts[0], p.options, p.max_tokens)
            async with contextlib.aclosing(text_deltas(ctx, owner, sample, texts)) as events:
                async for item in events:
                    if isinstance(item, bytes):
                        yield item
                    elif isinstance(item, SampleResult):
                        result = item
                    else:
                        index, text = item
                        event = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
                        yield render.sse({**chunk, "choices": [event]})
            assert result is not None
            stop_ids = p.target.base.eos_token_ids
            outputs = [render.output_of(p.codec, s, stop_ids, p.options.stop) for s in result.sequences]
            choices = [Choice(o.text, None, o.finish_reason, o.generated) for o in outputs]
        else:
            task = asyncio.ensure_future(_generate(ctx, owner, p, None))
            async with contextlib.aclosing(keepalive(task)) as comments:
                async for comment in comments:
                    yield comment
            choices = task.result()
    except Exception as exc:  # the stream has started: the error goes in an event
        response = error_response(exc)
        yield render.sse_error(response.status_code, bytes(response.body))
        return
    used = render.usage(prompt_tokens, sum(c.generated for c in choices))
    for i, c in enumerate(choices):
        rest = texts[i].finish(c.text) if live else c.text
        event: dict[str, object] = {
            **chunk,
            "choices": [{"index": i, "text": rest, "logprobs": c.logprobs, "finish_reason": c.finish_reason}],
        }
        if i == len(choices) - 1:
            event["usage"] = used
        yield render.sse(event)
    if include_usage:
        yield render.sse({**chunk, "choices": [], "usage": used})
    yield render.DONE
