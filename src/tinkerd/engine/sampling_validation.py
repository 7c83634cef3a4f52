"""Checks a sampling request against the model before it takes a place in the queue: a user's mistake becomes an
``InvalidRequestError`` naming the bad value, never a failure in the middle of a shared decode batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import SamplingParams
from tinkerd.engine.transformer import ModelShape

MAX_NUM_SAMPLES = 256
MAX_TOPK_PROMPT_LOGPROBS = 1024


def validate_sample_request(
    prompt: Sequence[int],
    params: SamplingParams,
    num_samples: int,
    topk_prompt_logprobs: int,
    shape: ModelShape,
    max_num_samples: int,
    can_decode_text: bool,
) -> None:
    vocab = shape.vocab_size
    if len(prompt) == 0:
        raise InvalidRequestError("prompt is empty: sampling needs at least one prompt token")
    for i, token in enumerate(prompt):
        if not 0 <= token < vocab:
            raise InvalidRequestError(f"prompt token {token} at position {i} is outside the vocabulary [0, {vocab})")
    if not 1 <= num_samples <= max_num_samples:
        raise InvalidRequestError(f"num_samples must be between 1 and {max_num_samples}, got {num_samples}")
    if params.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if len(prompt) + params.max_tokens > shape.max_positions:
        raise InvalidRequestError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context of "
            f"{shape.max_positions} tokens"
        )
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidRequestError(f"temperature must be a finite number >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:  # also rejects NaN
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k != -1 and params.top_k < 1:
        raise InvalidRequestError(f"top_k must be -1 (no limit) or a positive integer, got {params.top_k}")
    for token in params.stop_token_ids:
        if not 0 <= token < vocab:
            raise InvalidRequestError(f"stop token id {token} is outside the vocabulary [0, {vocab})")
    if params.stop_strings:
        if any(len(s) == 0 for s in params.stop_strings):
            raise InvalidRequestError("stop strings must not be empty")
        if not can_decode_text:
            raise InvalidRequestError("stop strings need a tokenizer, and this model is served without one")
    limit = min(vocab, MAX_TOPK_PROMPT_LOGPROBS)
    if not 0 <= topk_prompt_logprobs <= limit:
        raise InvalidRequestError(f"topk_prompt_logprobs must be between 0 and {limit}, got {topk_prompt_logprobs}")
