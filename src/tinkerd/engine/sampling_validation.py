"""Checks a sampling request against the model before it takes a place in the queue: a user's mistake becomes an
``InvalidRequestError`` naming the bad value, never a failure in the middle of a shared decode batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import LOGPROB_DISTRIBUTIONS, CellGrid, SamplingParams
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.transformer import ModelShape

MAX_NUM_SAMPLES = 256
MAX_TOPK_PROMPT_LOGPROBS = 1024


def validate_job(job: SampleJob, shape: ModelShape, max_num_samples: int, can_decode_text: bool) -> None:
    """Raise InvalidRequestError for anything wrong with a sampling request (any sampler backend, before it runs)."""
    validate_sample_request(
        job.prompt, job.params, job.num_samples, job.topk_prompt_logprobs, shape, max_num_samples, can_decode_text
    )
    validate_logprob_options(
        len(job.prompt),
        job.params,
        job.num_samples,
        shape.vocab_size,
        prompt_logprobs=job.prompt_logprobs,
        topk_sample_logprobs=job.topk_sample_logprobs,
        last_n=job.prompt_logprobs_last_n,
        targets=job.target_prompt_logprobs,
        alt_k=job.prompt_alt_tokens_k,
    )


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


# Cells of top-k or target logprobs one request may ask for (each is a (token, logprob) pair in its answer).
MAX_LOGPROB_CELLS = 1 << 20


def validate_logprob_options(
    prompt_length: int,
    params: SamplingParams,
    num_samples: int,
    vocab: int,
    *,
    prompt_logprobs: bool,
    topk_sample_logprobs: int,
    last_n: int | None,
    targets: CellGrid | None,
    alt_k: int,
) -> None:
    """The logprob options beyond prompt logprobs: each within its range and the answer within MAX_LOGPROB_CELLS."""
    if params.logprobs_of not in LOGPROB_DISTRIBUTIONS:
        raise InvalidRequestError(
            f"logprobs must be reported under one of {', '.join(LOGPROB_DISTRIBUTIONS)}, got {params.logprobs_of!r}"
        )
    limit = min(vocab, MAX_TOPK_PROMPT_LOGPROBS)
    if not 0 <= topk_sample_logprobs <= limit:
        raise InvalidRequestError(f"topk_sample_logprobs must be between 0 and {limit}, got {topk_sample_logprobs}")
    if topk_sample_logprobs * params.max_tokens * num_samples > MAX_LOGPROB_CELLS:
        raise InvalidRequestError(
            f"topk_sample_logprobs {topk_sample_logprobs} x max_tokens {params.max_tokens} x num_samples "
            f"{num_samples} asks for more than {MAX_LOGPROB_CELLS} logprobs; ask for fewer"
        )
    if last_n is not None:
        if not prompt_logprobs:
            raise InvalidRequestError("prompt_logprobs_last_n applies to prompt logprobs; set prompt_logprobs")
        if not 1 <= last_n <= prompt_length - 1:
            raise InvalidRequestError(
                f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {prompt_length - 1}, got {last_n}"
            )
    if not 0 <= alt_k <= limit:
        raise InvalidRequestError(f"prompt_alt_tokens_k must be between 0 and {limit}, got {alt_k}")
    if alt_k * (prompt_length - 1) > MAX_LOGPROB_CELLS:
        raise InvalidRequestError(
            f"prompt_alt_tokens_k {alt_k} x {prompt_length - 1} prompt positions is more than {MAX_LOGPROB_CELLS} draws"
        )
    if alt_k > 0 and prompt_length < 2:
        raise InvalidRequestError("prompt_alt_tokens_k needs a prompt of at least 2 tokens")
    if targets is not None:
        _validate_targets(prompt_length, vocab, targets)


def _validate_targets(prompt_length: int, vocab: int, targets: CellGrid) -> None:
    rows, cols = targets.shape
    if rows != prompt_length - 1:
        raise InvalidRequestError(
            f"target_prompt_logprobs needs len(prompt) - 1 = {prompt_length - 1} rows (row i scores prompt position "
            f"i + 1), got shape {list(targets.shape)}"
        )
    if all(int(token) == -1 for token in targets.values):
        raise InvalidRequestError("target_prompt_logprobs names no token id (every cell is -1)")
    if len(targets.values) > MAX_LOGPROB_CELLS:
        raise InvalidRequestError(
            f"target_prompt_logprobs names {len(targets.values)} ids, more than {MAX_LOGPROB_CELLS}"
        )
    distinct = len(set(targets.values) - {-1})
    if distinct > MAX_TOPK_PROMPT_LOGPROBS:
        raise InvalidRequestError(
            f"target_prompt_logprobs names {distinct} distinct ids; at most {MAX_TOPK_PROMPT_LOGPROBS} "
            "(the bound of a top-k width)"
        )
    for r, c, token in zip(targets.rows, targets.cols, targets.values, strict=True):
        if not 0 <= r < rows or not 0 <= c < cols:
            raise InvalidRequestError(
                f"target_prompt_logprobs cell ({r}, {c}) is outside its shape {list(targets.shape)}"
            )
        if not 0 <= int(token) < vocab and int(token) != -1:
            raise InvalidRequestError(
                f"target_prompt_logprobs[{r}][{c}] = {token} is outside the vocabulary [0, {vocab}) (use -1 for none)"
            )
