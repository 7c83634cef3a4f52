"""OpenAI wire requests (pydantic), with OpenAI's field names; unknown fields are tolerated and ignored.

Only requests are modelled: answers are built as plain JSON objects in ``render`` (each field named as the
``openai`` client reads it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(WireModel):
    include_usage: bool | None = None


class SamplingFields(WireModel):
    """What both endpoints take. Parameters tinkerd cannot honour are accepted only at their neutral values."""

    model: str
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but vLLM's and many clients'
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = False  # vLLM's: sample on past the end-of-sequence token (benchmarks, tests)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None  # how many top alternatives per token (0: the chosen token's logprob only)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(WireModel):
    type: str
    text: str | None = None


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, object]] | None = None
    tool_choice: object | None = None
    response_format: dict[str, object] | None = None
    # vLLM's spelling, which some chat UIs send: render the prompt without the assistant header and continue the
    # last message instead.
    add_generation_prompt: bool | None = True
