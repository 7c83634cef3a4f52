"""Streaming text as the sampler makes it: tokens arrive in progress reports, text goes out in deltas.

A token can end in the middle of a character (byte-level tokenizers), and text that may turn out to begin a stop
string must not go out before we know; so each choice holds back an incomplete character at its end and, when
there are stop strings, as many characters as the longest of them minus one. The final answer (``render.Output``,
stop token and stop string cut off) settles the rest.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Sequence

from tinkerd.api.context import ApiContext
from tinkerd.api.openai.sampling import stream_sample
from tinkerd.api.openai.text import TextCodec
from tinkerd.domain.ops import SampleResult
from tinkerd.domain.requests import Sample

log = logging.getLogger(__name__)


class IncrementalText:
    """One choice's text: what is safe to send so far, and what the final answer adds to it."""

    def __init__(self, codec: TextCodec, stops: Sequence[str]) -> None:
        self.codec = codec
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def feed(self, tokens: Sequence[int]) -> str:
        """Add tokens; the new text that can be sent now ("" if none)."""
        if self.stopped:
            return ""
        self.tokens += tokens
        text = self.codec.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            safe, self.stopped = text[:cut], True
        else:
            safe = text[: len(text) - self.hold] if self.hold else text
            safe = safe.rstrip("\ufffd")  # a character still missing its last bytes
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        new, self.sent = safe[len(self.sent) :], safe
        return new

    def finish(self, final: str) -> str:
        """The rest of the final text after what was sent."""
        if final.startswith(self.sent):
            return final[len(self.sent) :]
        log.warning("streamed text is not a prefix of the final answer; the rest is dropped")
        return ""


async def text_deltas(
    ctx: ApiContext, owner: str, sample: Sample, texts: list[IncrementalText]
) -> AsyncGenerator[tuple[int, str] | bytes | SampleResult, None]:
    """(choice index, new text) as tokens come, keep-alive comments (bytes), then the request's result."""
    async with contextlib.aclosing(stream_sample(ctx, owner, sample)) as items:
        async for item in items:
            if isinstance(item, bytes | SampleResult):
                yield item
                continue
            for report in item:
                new = texts[report.sample_index].feed(report.tokens)
                if new:
                    yield report.sample_index, new
