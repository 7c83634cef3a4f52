"""Sampling on the generic path: the continuous-batching ``Sampler``'s bookkeeping, logits by recomputation.

The packed sampler keeps every sequence's keys and values in its own cache layout, which needs our attention. A
Hugging Face model's attention is its own, so this sampler recomputes each live sequence's whole prefix every step
(one padded forward per adapter): quadratic in length, but exact and free of any model-specific cache format. The
slot cache still hands out slots (it stores zero positions), so admission, stamping of samples, stop handling,
seeds and prompt logprobs are the ``Sampler``'s own.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import cast

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import SampleResult
from tinkerd.engine import prompt_scoring
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import PROMPT_LOGPROB_CHUNK, Sampler
from tinkerd.engine.sampler_state import JobState
from tinkerd.engine.sampling_validation import MAX_NUM_SAMPLES
from tinkerd.engine.transformer import Transformer


class GenericSampler(Sampler):
    def __init__(
        self,
        model: GenericTransformer,
        decode_text: Callable[[list[int]], str] | None = None,
        max_batch: int = 64,
        max_num_samples: int = MAX_NUM_SAMPLES,
    ) -> None:
        # The base class reads only shape, dtype and device of its model outside the methods overridden here.
        super().__init__(cast(Transformer, model), decode_text, max_batch, max_num_samples)
        self.model = model

    def check_images(self, job: SampleJob) -> None:
        """Images are checked against the prompt, then processed and encoded (and cached) before the job queues."""
        if not job.images:
            return
        encoder = self.model.images
        if encoder is None:
            raise InvalidRequestError("the prompt holds images, but this model takes none")
        encoder.check(job.prompt, job.images, "prompt")
        for i, image in enumerate(job.images):
            encoder.encode(image, f"prompt image {i}")

    def _prefill(self, batch: list[JobState]) -> None:
        m = self.model
        s = m.shape
        no_positions = torch.zeros(s.num_layers, s.num_kv_heads, 0, s.head_dim, dtype=m.dtype, device=m.device)
        for state in batch:
            job = state.job
            logits_1_P_V = m.padded_logits([job.prompt], job.weights, [job.images])
            state.last_logits_1_V = logits_1_P_V[0, -1:]
            state.k_L_G_P_D = state.v_L_G_P_D = no_positions  # nothing to copy into a slot: decode recomputes
            questions = job.prompt_questions()
            if questions.any():

                def logits_of(a: int, e: int, logits_P_V: torch.Tensor = logits_1_P_V[0]) -> torch.Tensor:
                    return logits_P_V[a:e]

                state.prompt = prompt_scoring.answer(job.prompt, job.params, questions, logits_of, PROMPT_LOGPROB_CHUNK)

    def _decode(self, done: list[tuple[int, SampleResult]]) -> None:
        rows = list(self._rows)
        seqs = [list(itertools.chain(r.job.job.prompt, r.tokens)) for r in rows]
        images = [r.job.job.images for r in rows]  # in the prompt: generated tokens follow them
        logits_B_V = self.model.last_logits(seqs, [r.job.job.weights for r in rows], images)
        self._advance(rows, logits_B_V, done)
