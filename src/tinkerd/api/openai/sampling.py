"""Running OpenAI requests on the sampler: build the domain ``Sample``, submit it through the api's own submit helper
(the ledger, the queue cap, the in-process hand-off), wait for its result, and cancel it when the client goes away.

Cancelling fails the request in the ledger ("cancelled"); the worker drops requests the ledger holds as finished
from its decode batch at its next check (``SamplingService.drop_cancelled``), freeing their sequences' slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tinkerd.api.context import ApiContext
from tinkerd.api.openai.errors import OpenAIError
from tinkerd.api.openai.models import Target
from tinkerd.api.openai.schemas import SamplingFields
from tinkerd.api.submit import in_thread, submit
from tinkerd.domain import codec
from tinkerd.domain.errors import CapacityError, TinkerdError
from tinkerd.domain.ops import SampleResult, SamplingParams
from tinkerd.domain.records import FutureState, RequestKind
from tinkerd.domain.requests import Sample, SampleProgress

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_N = 128
# While a streamed request waits for the sampler, a comment line goes out this often: a closed connection then
# fails a write, which ends the stream and cancels the request, whatever the ASGI server's disconnect reporting.
KEEPALIVE_S = 1.0
KEEPALIVE = b": keep-alive\n\n"
CANCELLED_MESSAGE = "cancelled: the OpenAI client went away before its answer"


class ClientGone(Exception):
    """The HTTP client disconnected while its request ran."""


@dataclass(frozen=True)
class Options:
    """The sampling options of one request, checked."""

    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool = False


def check_options(body: SamplingFields) -> Options:
    """Everything but max_tokens (which depends on the prompt); OpenAIError naming the bad parameter."""
    n, temperature, top_p, top_k = body.n, body.temperature, body.top_p, body.top_k
    seed, stop, ignore_eos = body.seed, body.stop, body.ignore_eos
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise OpenAIError(f"n must be between 1 and {MAX_N}, got {n}", param="n")
    temperature = 1.0 if temperature is None else temperature
    if not 0.0 <= temperature <= 2.0:  # also NaN
        raise OpenAIError(f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    top_p = 1.0 if top_p is None else top_p
    if not 0.0 < top_p <= 1.0:
        raise OpenAIError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    top_k = -1 if top_k is None or top_k == 0 else top_k
    if top_k < -1:
        raise OpenAIError(f"top_k must be -1, 0 (no limit) or positive, got {top_k}", param="top_k")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise OpenAIError(f"seed must fit in 64 bits, got {seed}", param="seed")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > 4:
        raise OpenAIError(f"stop takes at most 4 sequences, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise OpenAIError("stop sequences must not be empty", param="stop")
    return Options(n, 0, temperature, top_p, top_k, seed, stops, bool(ignore_eos))


def check_max_tokens(value: int | None, prompt_len: int, context: int, *, param: str, minimum: int = 1) -> int:
    """max_tokens as asked (or all the context the prompt leaves when unset), checked against the context."""
    room = context - prompt_len
    if room < 1:
        raise OpenAIError(
            f"the prompt is {prompt_len} tokens, and this model's context is {context} tokens", param="messages"
        )
    if value is None:
        return room
    if value < minimum:
        raise OpenAIError(f"{param} must be >= {minimum}, got {value}", param=param)
    if value > room:
        raise OpenAIError(
            f"prompt ({prompt_len} tokens) + {param} ({value}) exceeds the model's context of {context} tokens",
            param=param,
        )
    return value


def build_sample(
    target: Target,
    prompt: list[int],
    options: Options,
    max_tokens: int,
    *,
    prompt_logprobs: bool = False,
    topk_prompt_logprobs: int = 0,
) -> Sample:
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        seed=options.seed,
        stop_strings=options.stop,
        stop_token_ids=() if options.ignore_eos else target.base.eos_token_ids,
    )
    return Sample(
        sampler_id=target.sampler_id,
        prompt=prompt,
        num_samples=options.n,
        params=params,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk_prompt_logprobs,
    )


def scoring_sample(target: Target, tokens: list[int], k: int) -> Sample:
    """A request whose prompt logprobs give the top-`k` alternatives at every position of `tokens`."""
    return Sample(
        sampler_id=target.sampler_id,
        prompt=tokens,
        num_samples=1,
        params=SamplingParams(max_tokens=1, stop_token_ids=()),
        topk_prompt_logprobs=k,
    )


Disconnected = Callable[[], Awaitable[bool]]


async def submit_sample(ctx: ApiContext, owner: str, sample: Sample) -> str:
    """Record `sample` in the ledger (handing it to a worker in this process); its request id."""
    token_count = len(sample.prompt) + sample.params.max_tokens * sample.num_samples
    record = await in_thread(
        lambda: submit(
            ctx, owner, model_id=sample.sampler_id, seq_id=None, kind=RequestKind.SAMPLE, payload=sample,
            token_count=token_count,
        )
    )  # fmt: skip
    return record.request_id


async def run_sample(
    ctx: ApiContext, owner: str, sample: Sample, disconnected: Disconnected | None = None
) -> SampleResult:
    """Submit `sample` and wait for its result; cancels it (and raises ClientGone) when the client goes away, and
    on cancellation of the awaiting task (a closed stream)."""
    request_id = await submit_sample(ctx, owner, sample)
    try:
        return await wait_result(ctx, owner, request_id, disconnected)
    except (ClientGone, asyncio.CancelledError):
        _cancel_soon(ctx, request_id)
        raise


Streamed = list[SampleProgress] | SampleResult | bytes


async def stream_sample(ctx: ApiContext, owner: str, sample: Sample) -> AsyncGenerator[Streamed, None]:
    """Submit `sample`; yield its progress reports as the worker decodes (a worker in this process reports them),
    keep-alive comments (bytes) while nothing comes, and finally its result. Closing the iterator early (the client
    went away) cancels the request."""
    request_id = await submit_sample(ctx, owner, sample)
    with ctx.notifier.watch(request_id) as queue:
        task = asyncio.ensure_future(wait_result(ctx, owner, request_id, None))
        try:
            while not task.done():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({task, getter}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
                if not done:
                    yield KEEPALIVE
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
                _cancel_soon(ctx, request_id)


def _cancel_soon(ctx: ApiContext, request_id: str) -> None:
    """Fail the request in the ledger from a thread (this task may be cancelled: no awaiting here)."""

    def cancel() -> None:
        with contextlib.suppress(TinkerdError):  # finished meanwhile: nothing to stop
            ctx.store.futures.fail(request_id, CANCELLED_MESSAGE, "user")
            log.info("cancelled %s: its OpenAI client went away", request_id)

    asyncio.get_running_loop().run_in_executor(None, cancel)


async def wait_result(ctx: ApiContext, owner: str, request_id: str, disconnected: Disconnected | None) -> SampleResult:
    """The result of a submitted sampling request, once the worker has it (OpenAIError if it failed by the user's
    fault); raises ClientGone when `disconnected` says the client went away."""
    look = not ctx.notifier.expected(request_id)
    with ctx.notifier.waiter(request_id) as woken:
        while True:
            woken.clear()
            handed = ctx.notifier.finished(request_id, owner)
            if handed is not None:
                record, value = handed.record, handed.value
                break
            if look:
                record = await in_thread(ctx.store.futures.get, request_id, owner)
                if record.state.finished:
                    value = None
                    break
            look = True
            if ctx.notifier.closed:
                raise CapacityError("the server is shutting down; retry the request")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ctx.settings.poll_interval_s):
                    await woken.wait()
            if disconnected is not None and await disconnected():
                raise ClientGone
    ctx.notifier.answered(request_id)
    ctx.deliveries.note(request_id)
    if record.state is FutureState.FAILED:
        message = record.error_message or "sampling failed"
        if record.error_category == "user":
            raise OpenAIError(message)
        raise RuntimeError(message)
    result = value if value is not None else codec.decode(record.result or b"")
    if not isinstance(result, SampleResult):
        raise RuntimeError(f"request {request_id} answered {type(result).__name__}, not a sample")
    return result


async def top_alternatives(
    ctx: ApiContext,
    owner: str,
    target: Target,
    prompt: list[int],
    completions: list[list[int]],
    k: int,
    disconnected: Disconnected | None = None,
) -> list[list[list[tuple[int, float]]]]:
    """The `k` most likely tokens (with logprobs) at each position of each completion of `prompt`, from one scoring
    pass per completion (the sampler reports alternatives for prompt positions only). Raw model logprobs: what
    ``top_logprobs`` means in OpenAI's API, whatever temperature sampled the completion."""
    context = target.base.max_context_length

    async def score(tokens: list[int]) -> list[list[tuple[int, float]]]:
        if not tokens:
            return []
        full = (prompt + tokens)[: context - 1]  # the scoring request samples one token after it
        result = await run_sample(ctx, owner, scoring_sample(target, full, k), disconnected)
        topk = result.topk_prompt_logprobs or []
        return [list(topk[len(prompt) + i] or []) if len(prompt) + i < len(topk) else [] for i in range(len(tokens))]

    return list(await asyncio.gather(*(score(tokens) for tokens in completions)))


async def keepalive(task: asyncio.Task[T], interval_s: float = KEEPALIVE_S) -> AsyncGenerator[bytes, None]:
    """Server-sent-event comments until `task` is done; cancels `task` if the stream ends first (client gone)."""
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
    finally:
        if not task.done():
            task.cancel()
