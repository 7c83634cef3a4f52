"""Sampling on the generic path: the continuous-batching ``Sampler``'s bookkeeping, logits from the model's own forward.

The packed sampler keeps every sequence's keys and values in its own cache layout, which needs our attention. A
Hugging Face model's attention is its own, and so is its cache: full attention keeps keys and values, GPT-OSS's
sliding layers keep a window, Qwen3.5's gated delta-net layers keep a convolution window and a recurrent state. This
sampler therefore decodes against the model's own ``Cache`` object (``GenericTransformer.prefill`` / ``decode``),
never reading inside it beyond selecting batch rows (``reorder_cache``, which every cache layer implements).

Batching: a *cohort* is a set of rows that decode in lockstep in one batched cache: one adapter, one length. A cohort
is born from one prefill group (prompts of one adapter and one length, prefilled in one unpadded forward), holding a
copy of the group's cache row for each of its samples; rows that finish leave it (their cache rows are dropped); each
step runs one forward per cohort. Rows of different lengths are never padded into one cache: a pad token would enter
a linear-attention layer's recurrent and convolution states (which take no attention mask when decoding) and shift
rotary positions, so exactness would rest on each model's masking. The price is one forward per cohort rather than
one per step: requests that arrive together (the same prompt length and adapter) share one; a request that arrives
alone decodes alone, still one token per forward instead of its whole prefix.

Images: a Qwen-VL model's rotary positions after an image run behind the token count, by an offset its forward keeps
on the model itself (one value for whatever prefilled last). A prompt with images is prefilled alone, its offset read
then (``GenericTransformer.prefill``), and its cohort decodes with explicit positions, so cohorts of other prompts can
decode in between. A vision-language model without that layout, and ``decode_with_cache=False``, recompute each live
sequence's whole prefix every step instead: quadratic in length but free of any cache.

The slot cache still hands out slots (it stores zero positions), so admission, stamping of samples, stop handling,
seeds and prompt logprobs are the ``Sampler``'s own.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import SampleResult
from tinkerd.engine import prompt_scoring
from tinkerd.engine.generic_model import GenericTransformer
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler import PROMPT_LOGPROB_CHUNK, Sampler
from tinkerd.engine.sampler_state import JobState, Row
from tinkerd.engine.sampling_validation import MAX_NUM_SAMPLES
from tinkerd.engine.transformer import Transformer


@dataclass(eq=False)
class _PromptGroup:
    """Prompts of one adapter and one length prefilled in one forward: row j of ``cache`` is the group's j-th prompt."""

    weights: LoraWeights | None
    cache: Any
    offsets_G: torch.Tensor | None  # multimodal rotary offsets (GenericTransformer.prefill)


@dataclass(eq=False)
class _Cohort:
    """Rows decoding in lockstep: row b of ``cache`` is ``rows[b]``; all have the same length and adapter."""

    weights: LoraWeights | None
    rows: list[Row]
    cache: Any
    offsets_B: torch.Tensor | None


Offsets = torch.Tensor | None  # multimodal rotary offsets of a cache's rows (GenericTransformer.prefill)


def _rows_of(cache: Any, offsets: Offsets, rows: list[int], copied: bool) -> tuple[Any, Offsets]:
    """``cache`` (and its rows' rotary offsets) with only these batch rows (repeats allowed), in this order: a copy
    when ``copied``, else narrowed in place (``reorder_cache``, which every cache layer implements)."""
    out = copy.deepcopy(cache) if copied else cache
    index = torch.tensor(rows, dtype=torch.long)
    out.reorder_cache(index)
    return out, None if offsets is None else offsets[index.to(offsets.device)]


class GenericSampler(Sampler):
    def __init__(
        self,
        model: GenericTransformer,
        decode_text: Callable[[list[int]], str] | None = None,
        max_batch: int = 64,
        max_num_samples: int = MAX_NUM_SAMPLES,
        decode_with_cache: bool = True,
    ) -> None:
        # The base class reads only shape, dtype and device of its model outside the methods overridden here.
        super().__init__(cast(Transformer, model), decode_text, max_batch, max_num_samples)
        self.model = model
        self.cached = decode_with_cache and model.decodes_with_cache
        self._groups: dict[int, tuple[_PromptGroup, int]] = {}  # ticket -> its prompt's group and row there
        self._born: dict[int, tuple[_PromptGroup, list[tuple[Row, int]]]] = {}  # rows stamped since the last decode
        self._cohorts: list[_Cohort] = []

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

    def cancel(self, ticket: int) -> bool:
        self._groups.pop(ticket, None)  # its rows leave their cohorts at the next decode (they are no longer live)
        return super().cancel(ticket)

    def step(self) -> list[tuple[int, SampleResult]]:
        done = super().step()
        if not self._rows:  # idle: let go of caches whose rows finished without a decode since
            self._born.clear()
            self._cohorts.clear()
        return done

    # -- prefill ----------------------------------------------------------------------------------------------------

    def _prefill(self, batch: list[JobState]) -> None:
        m = self.model
        s = m.shape
        no_positions = torch.zeros(s.num_layers, s.num_kv_heads, 0, s.head_dim, dtype=m.dtype, device=m.device)
        groups: dict[tuple[int, int], list[JobState]] = {}
        for state in batch:
            shared = self.cached and not state.job.images
            key = (id(state.job.weights), len(state.job.prompt)) if shared else (id(state), 0)
            groups.setdefault(key, []).append(state)
        for members in groups.values():
            weights = members[0].job.weights
            images = [st.job.images for st in members]
            if self.cached:
                last_only = not any(st.job.prompt_questions().any() for st in members)
                prompts = [st.job.prompt for st in members]
                logits_G_P_V, cache, offsets_G = m.prefill(prompts, weights, images, last_only)
                group = _PromptGroup(weights, cache, offsets_G)
                for j, state in enumerate(members):
                    self._groups[state.ticket] = (group, j)
            else:
                logits_G_P_V = m.padded_logits([st.job.prompt for st in members], weights, images)
            for j, state in enumerate(members):
                state.last_logits_1_V = logits_G_P_V[j, -1:]
                state.k_L_G_P_D = state.v_L_G_P_D = no_positions  # the slot cache holds nothing: see the module doc
                _answer_prompt(state, logits_G_P_V[j])

    def _stamp(self, state: JobState, limit: int) -> list[Row]:
        rows = super()._stamp(state, limit)
        if self.cached:
            group, j = self._groups[state.ticket]
            self._born.setdefault(id(group), (group, []))[1].extend((row, j) for row in rows)
            if state.next_sample == state.job.num_samples:
                del self._groups[state.ticket]
        return rows

    # -- decoding ---------------------------------------------------------------------------------------------------

    def _decode(self, done: list[tuple[int, SampleResult]]) -> None:
        if not self.cached:
            rows = list(self._rows)
            seqs = [list(itertools.chain(r.job.job.prompt, r.tokens)) for r in rows]
            images = [r.job.job.images for r in rows]  # in the prompt: generated tokens follow them
            logits_B_V = self.model.last_logits(seqs, [r.job.job.weights for r in rows], images)
            self._advance(rows, logits_B_V, done)
            return
        self._update_cohorts()
        device = self.model.device
        for cohort in list(self._cohorts):
            tokens_B = torch.tensor([r.tokens[-1] for r in cohort.rows], dtype=torch.long, device=device)
            positions_B = None
            if cohort.offsets_B is not None:
                positions_B = torch.tensor([r.position for r in cohort.rows], device=device) + cohort.offsets_B
            logits_B_V = self.model.decode(tokens_B, cohort.weights, cohort.cache, positions_B)
            self._advance(cohort.rows, logits_B_V, done)

    def _update_cohorts(self) -> None:
        """Rows stamped since the last decode form one cohort per prompt group (each with its own copy of the group's
        cache rows: the group may stamp more samples later); rows finished or cancelled leave their cohort."""
        live = {id(r) for r in self._rows}
        for group, born in self._born.values():
            members = [(row, j) for row, j in born if id(row) in live]
            if members:
                cache, offsets = _rows_of(group.cache, group.offsets_G, [j for _, j in members], copied=True)
                self._cohorts.append(_Cohort(group.weights, [row for row, _ in members], cache, offsets))
        self._born.clear()
        kept: list[_Cohort] = []
        for cohort in self._cohorts:
            stay = [b for b, row in enumerate(cohort.rows) if id(row) in live]
            if len(stay) < len(cohort.rows) and stay:
                cohort.cache, cohort.offsets_B = _rows_of(cohort.cache, cohort.offsets_B, stay, copied=False)
                cohort.rows = [cohort.rows[b] for b in stay]
            if stay:
                kept.append(cohort)
        self._cohorts = kept


def _answer_prompt(state: JobState, logits_P_V: torch.Tensor) -> None:
    job = state.job
    questions = job.prompt_questions()
    if questions.any():

        def logits_of(a: int, e: int) -> torch.Tensor:
            return logits_P_V[a:e]

        state.prompt = prompt_scoring.answer(job.prompt, job.params, questions, logits_of, PROMPT_LOGPROB_CHUNK)
