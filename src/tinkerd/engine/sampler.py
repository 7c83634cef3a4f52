"""A continuous-batching sampler over one ``Transformer``: many requests, many adapters, one decode batch.

Each ``step()`` first admits waiting requests (their prompts are prefilled together in one packed forward, each
prompt once whatever its ``num_samples``; its keys/values are then copied into one cache slot per sample), then
advances every live sequence by one token in a single batched forward against the KV cache. Rows are ordered by
adapter so each adapter's rows form one contiguous ``LoraRouting`` segment (the base model is ``weights=None``).
Finished sequences free their slot at once, and a request is returned when its last sample finishes. A request
with more samples than free slots keeps its prefilled prompt and stamps out the rest as slots free up.

Stopping: a sequence stops after a token in ``stop_token_ids`` or once its generated text (``decode_text`` of all its
tokens) contains a stop string; in both cases the tokens returned include the token that stopped it, as Tinker and
vLLM do (tinker-cookbook's renderers expect the stop token at the end of a response, and its ``RoleColonRenderer``
splits the decoded response on its stop string). Otherwise it stops with reason "length" at ``max_tokens``.

Logprobs: given a ``scorer`` (the training ``Transformer``), every finished request is scored once more by the
training forward and reports those logprobs, bit-identical to ``forward()`` on the same tokens (engine/rescoring.py).

Speed: give it a ``Transformer`` of its own, prepared with ``decode_layout.use_decode_layout`` (oneDNN-packed
weights: ~2x faster decoding and prefill on CPU). Pure engine: no threads, no I/O. The caller serialises calls.

The request it takes is ``sample_job.SampleJob`` (checked by ``sampling_validation.validate_job``); the records it
keeps per request and per live sequence are in ``sampler_state``.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence

import torch

from tinkerd.domain.errors import InvalidRequestError
from tinkerd.domain.ops import SampledSequence, SampleResult, StopReason
from tinkerd.engine import prompt_scoring, reported_logprobs
from tinkerd.engine.kv_cache import KVCache, prefill_attention
from tinkerd.engine.lora import LoraRouting, LoraWeights, Segment
from tinkerd.engine.rescoring import RescoreItem, rescore
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.sampler_state import JobState, Row
from tinkerd.engine.sampling_ops import draw_uniforms, sample_tokens
from tinkerd.engine.sampling_validation import MAX_NUM_SAMPLES, validate_job
from tinkerd.engine.transformer import AttentionFn, Transformer

# Prompt tokens prefilled in one packed forward (at least one whole prompt is always taken).
MAX_PREFILL_TOKENS = 4096
# Prompt positions whose full-vocabulary logits are materialised at once for prompt logprobs.
PROMPT_LOGPROB_CHUNK = 512


def _adapter_order(weights: LoraWeights | None) -> int:
    return 0 if weights is None else id(weights)


def _last_logits(state: JobState) -> torch.Tensor:
    assert state.last_logits_1_V is not None, "a request is prefilled before its samples get slots"
    return state.last_logits_1_V


def _routing(weights_per_row: Sequence[LoraWeights | None], rows_per_item: Sequence[int]) -> LoraRouting:
    """Contiguous segments for items already grouped by adapter; item i spans ``rows_per_item[i]`` rows."""
    segments: list[Segment] = []
    start = 0
    for weights, n in zip(weights_per_row, rows_per_item, strict=True):
        if segments and segments[-1].weights is weights:
            segments[-1] = Segment(segments[-1].start, start + n, weights)
        else:
            segments.append(Segment(start, start + n, weights))
        start += n
    return LoraRouting(tuple(segments))


class Sampler:
    def __init__(
        self,
        transformer: Transformer,
        decode_text: Callable[[list[int]], str] | None = None,
        max_batch: int = 64,
        max_num_samples: int = MAX_NUM_SAMPLES,
        max_prefill_tokens: int = MAX_PREFILL_TOKENS,
        scorer: Transformer | None = None,
    ) -> None:
        self.transformer = transformer
        # the training forward: when set, finished requests report its logprobs (see engine/rescoring.py)
        self.scorer = scorer
        self._finished_jobs: dict[int, SampleJob] = {}
        self.decode_text = decode_text
        self.max_batch = max_batch
        self.max_num_samples = max_num_samples
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = KVCache(transformer.shape, transformer.act_dtype, transformer.device, max_batch)
        self._tickets = itertools.count()
        self._waiting: deque[JobState] = deque()  # not prefilled yet
        self._stamping: deque[JobState] = deque()  # prefilled, some samples still without a slot
        self._rows: list[Row] = []
        self._jobs: dict[int, JobState] = {}  # every request not yet finished or cancelled, by ticket

    # -- the public surface -----------------------------------------------------------------------------------------

    def submit(self, job: SampleJob) -> int:
        """Queue a request (validated now, so a bad one never reaches a batch); returns its ticket."""
        self.check_images(job)
        validate_job(job, self.transformer.shape, self.max_num_samples, self.decode_text is not None)
        ticket = next(self._tickets)
        state = JobState(
            ticket=ticket,
            job=job,
            sequences=[None] * job.num_samples,
            stop_ids=frozenset(job.params.stop_token_ids),
            unfinished=job.num_samples,
        )
        self._waiting.append(state)
        self._jobs[ticket] = state
        return ticket

    def has_work(self) -> bool:
        return bool(self._waiting or self._stamping or self._rows)

    def cancel(self, ticket: int) -> bool:
        """Drop a request wherever it is (waiting, partly stamped, decoding) and free its cache slots at once; its
        result never comes. False when the ticket is not here (finished already, or never submitted)."""
        found = self._jobs.pop(ticket, None) is not None
        for queue in (self._waiting, self._stamping):
            for state in [s for s in queue if s.ticket == ticket]:
                queue.remove(state)
                found = True
        kept: list[Row] = []
        for row in self._rows:
            if row.job.ticket == ticket:
                self.cache.release(row.slot)
                found = True
            else:
                kept.append(row)
        self._rows = kept
        return found

    def progress(self, ticket: int) -> list[tuple[list[int], list[float]]] | None:
        """For streaming: the tokens and logprobs each sample of a request has so far (empty for a sample without a
        slot yet); None once the request is finished or cancelled. The lists are the sampler's own: copy what you
        keep, and read them on the thread that calls ``step``."""
        state = self._jobs.get(ticket)
        if state is None:
            return None
        out: list[tuple[list[int], list[float]]] = []
        for i, done in enumerate(state.sequences):
            row = state.live.get(i)
            if done is not None:
                out.append((done.tokens, done.logprobs))
            elif row is not None:
                out.append((row.tokens, row.logprobs))
            else:
                out.append(([], []))
        return out

    def check_images(self, job: SampleJob) -> None:
        """The packed forward reads tokens only: a prompt with images is for a vision-language model's sampler."""
        if job.images:
            raise InvalidRequestError("the prompt holds images, but this model takes none")

    def step(self) -> list[tuple[int, SampleResult]]:
        """Admit what fits, advance every live sequence by one token; returns the requests that finished.

        A request admitted in this step gets its first token from its prefill and then decodes along with the
        rest, so it leaves the step with two tokens: joining the running batch costs one more row, not a pass."""
        done: list[tuple[int, SampleResult]] = []
        with torch.inference_mode():
            self._admit(done)
            if self._rows:
                self._decode(done)
        jobs = [self._finished_jobs.pop(ticket) for ticket, _ in done]
        if done and self.scorer is not None:
            items = [
                RescoreItem(job.prompt, job.weights, job.params, result)
                for job, (_, result) in zip(jobs, done, strict=True)
            ]
            rescored = rescore(self.scorer, items)
            done = [(ticket, result) for (ticket, _), result in zip(done, rescored, strict=True)]
        return done

    def run(self, jobs: Sequence[SampleJob]) -> list[SampleResult]:
        """Submit ``jobs`` and step until all of them finish; results in the order of ``jobs``.

        For a sampler with nothing else in flight (the results of other requests would have nowhere to go)."""
        if self.has_work():
            raise RuntimeError("Sampler.run needs an idle sampler; drive submit() and step() yourself instead")
        tickets = [self.submit(job) for job in jobs]
        results: dict[int, SampleResult] = {}
        while self.has_work():
            results.update(self.step())
        return [results[t] for t in tickets]

    # -- admission --------------------------------------------------------------------------------------------------

    def _admit(self, done: list[tuple[int, SampleResult]]) -> None:
        new_rows: list[Row] = []
        while self._stamping and self.cache.num_free > 0:
            state = self._stamping[0]
            new_rows += self._stamp(state, self.cache.num_free)
            if state.next_sample == state.job.num_samples:
                self._stamping.popleft()
        if self._waiting and self.cache.num_free > 0:
            batch = self._take_prefill_batch(self.cache.num_free)
            self._prefill(batch)
            for state in batch:
                if self.cache.num_free > 0:
                    new_rows += self._stamp(state, self.cache.num_free)
                if state.next_sample < state.job.num_samples:
                    state.own_prompt()  # the batch's packed keys/values are freed once the others have theirs
                    self._stamping.append(state)
        if new_rows:
            # each new sequence's first token comes from its prompt's last-position logits
            logits_B_V = torch.cat([_last_logits(row.job) for row in new_rows])
            self._rows += new_rows
            self._advance(new_rows, logits_B_V, done)

    def _take_prefill_batch(self, free_slots: int) -> list[JobState]:
        """Waiting requests in arrival order, while their prompts fit the token budget and their samples the slots."""
        batch: list[JobState] = []
        tokens = samples = 0
        while self._waiting:
            job = self._waiting[0].job
            if batch and (tokens + len(job.prompt) > self.max_prefill_tokens or samples + job.num_samples > free_slots):
                break
            batch.append(self._waiting.popleft())
            tokens += len(job.prompt)
            samples += job.num_samples
        return batch

    def _prefill(self, batch: list[JobState]) -> None:
        """One packed forward over the prompts (grouped by adapter): keeps their K/V and last-position logits."""
        t = self.transformer
        batch.sort(key=lambda s: _adapter_order(s.job.weights))  # stable: arrival order within an adapter
        lens = [len(s.job.prompt) for s in batch]
        adapters = [s.job.weights for s in batch]
        tokens_N = torch.tensor([tok for s in batch for tok in s.job.prompt], dtype=torch.long, device=t.device)
        positions_N = torch.cat([torch.arange(n, device=t.device) for n in lens])
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        attend = prefill_attention(t.packed_attention(lens), keys, values)
        h_N_d = self._prefill_hidden(batch, tokens_N, positions_N, _routing(adapters, lens), attend)

        ends = list(itertools.accumulate(lens))
        last_J = torch.tensor([e - 1 for e in ends], device=t.device)
        last_logits_J_V = t.logits(h_N_d[last_J], _routing(adapters, [1] * len(batch)))
        k_L_N_G_D, v_L_N_G_D = torch.stack(keys), torch.stack(values)
        for j, state in enumerate(batch):
            start, end = ends[j] - lens[j], ends[j]
            state.k_L_G_P_D = k_L_N_G_D[:, start:end].transpose(1, 2)
            state.v_L_G_P_D = v_L_N_G_D[:, start:end].transpose(1, 2)
            state.last_logits_1_V = last_logits_J_V[j : j + 1]
            questions = state.job.prompt_questions()
            if questions.any():
                h_P_d = h_N_d[start:end]
                weights = state.job.weights

                def logits_of(
                    s: int, e: int, h_P_d: torch.Tensor = h_P_d, w: LoraWeights | None = weights
                ) -> torch.Tensor:
                    return t.logits(h_P_d[s:e], LoraRouting.single(e - s, w))

                state.prompt = prompt_scoring.answer(
                    state.job.prompt, state.job.params, questions, logits_of, PROMPT_LOGPROB_CHUNK
                )

    def _stamp(self, state: JobState, limit: int) -> list[Row]:
        """Give up to ``limit`` more samples of a prefilled request a slot holding a copy of its prompt's K/V."""
        assert state.k_L_G_P_D is not None and state.v_L_G_P_D is not None
        job = state.job
        n = min(limit, job.num_samples - state.next_sample)
        slots = [self.cache.allocate() for _ in range(n)]
        self._store_prompt(slots, state)
        rows = [
            Row(state, i, slot, draw_uniforms(job.params.seed, i, job.params.max_tokens))
            for i, slot in zip(range(state.next_sample, state.next_sample + n), slots, strict=True)
        ]
        state.live.update((row.sample_index, row) for row in rows)
        state.next_sample += n
        if state.next_sample == job.num_samples:
            state.drop_prompt()
        return rows

    # -- what a model with other layers than attention overrides (hybrid_sampler.py) -------------------------------

    def _prefill_hidden(
        self,
        batch: list[JobState],
        tokens_N: torch.Tensor,
        positions_N: torch.Tensor,
        routing: LoraRouting,
        attend: AttentionFn,
    ) -> torch.Tensor:
        """Hidden states of the packed prompts of ``batch`` (``attend`` keeps their keys and values)."""
        return self.transformer.hidden(tokens_N, positions_N, routing, attend)

    def _store_prompt(self, slots: list[int], state: JobState) -> None:
        """Copy a prefilled prompt into the cache slots of its samples."""
        assert state.k_L_G_P_D is not None and state.v_L_G_P_D is not None
        self.cache.store_prompt(slots, state.k_L_G_P_D, state.v_L_G_P_D)

    def _decode_hidden(
        self, rows: list[Row], tokens_B: torch.Tensor, positions_B: torch.Tensor, routing: LoraRouting
    ) -> torch.Tensor:
        """Hidden states of each row's next token (``tokens_B``, at ``positions_B``) against its cache slot."""
        t = self.transformer
        slots, positions = [r.slot for r in rows], [r.position for r in rows]
        attend = self.cache.decode_attention(slots, positions, t.attn_scale, t.layer_windows, t.attention_sinks)
        return t.hidden(tokens_B, positions_B, routing, attend)

    # -- decoding ---------------------------------------------------------------------------------------------------

    def _decode(self, done: list[tuple[int, SampleResult]]) -> None:
        t = self.transformer
        rows = sorted(self._rows, key=lambda r: (_adapter_order(r.job.job.weights), r.slot))
        tokens_B = torch.tensor([r.tokens[-1] for r in rows], dtype=torch.long, device=t.device)
        positions_B = torch.tensor([r.position for r in rows], device=t.device)
        routing = _routing([r.job.job.weights for r in rows], [1] * len(rows))
        h_B_d = self._decode_hidden(rows, tokens_B, positions_B, routing)
        self._advance(rows, t.logits(h_B_d, routing), done)

    def _advance(self, rows: list[Row], logits_B_V: torch.Tensor, done: list[tuple[int, SampleResult]]) -> None:
        """Sample one token per row, append it, and retire the rows that stop."""
        params = [r.job.job.params for r in rows]
        tokens_B, logprobs_B = sample_tokens(
            logits_B_V,
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [r.uniforms[len(r.tokens)] for r in rows],
        )
        logprobs = logprobs_B.tolist()
        other = [i for i, r in enumerate(rows) if r.job.job.reports_otherwise()]
        if other:
            self._report_otherwise(rows, other, logits_B_V, tokens_B, logprobs)
        finished: list[Row] = []
        for row, token, logprob, p in zip(rows, tokens_B.tolist(), logprobs, params, strict=True):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            if token in row.job.stop_ids or (p.stop_strings and self._hits_stop_string(row, p.stop_strings)):
                self._finish(row, "stop", done)
                finished.append(row)
            elif len(row.tokens) >= p.max_tokens:
                self._finish(row, "length", done)
                finished.append(row)
        if finished:
            gone = {id(r) for r in finished}
            self._rows = [r for r in self._rows if id(r) not in gone]

    def _report_otherwise(
        self,
        rows: list[Row],
        which: list[int],
        logits_B_V: torch.Tensor,
        tokens_B: torch.Tensor,
        logprobs: list[float],
    ) -> None:
        """Rows whose requests ask for another distribution than ``sample_tokens`` reports, or for top-k lists: their
        chosen logprobs (overwritten in ``logprobs``) and top-k lists (appended to the rows) from the whole reported
        distribution (``reported_logprobs``)."""
        idx = torch.tensor(which, device=logits_B_V.device)
        params = [rows[i].job.job.params for i in which]
        reported_R_V = reported_logprobs.reported_logprobs(
            logits_B_V[idx],
            [p.temperature for p in params],
            [p.top_k for p in params],
            [p.top_p for p in params],
            [p.logprobs_of for p in params],
        )
        for i, value in zip(which, reported_logprobs.chosen(reported_R_V, tokens_B[idx]), strict=True):
            # -inf would mean the token fell outside the kept set recomputed here, which the shared threshold rule
            # rules out; should rounding ever do it, keep the finite tempered value rather than fail the request
            if math.isfinite(value):
                logprobs[i] = value
        ks = [rows[i].job.job.topk_sample_logprobs for i in which]
        for i, k, pairs in zip(which, ks, reported_logprobs.topk_rows(reported_R_V, ks), strict=True):
            if k > 0:
                rows[i].topk.append(pairs)

    def _hits_stop_string(self, row: Row, stop_strings: Sequence[str]) -> bool:
        # Whole-text decode each step: exact for any tokenizer (a suffix decode can drop or merge characters at its
        # edge), and cheap next to a forward pass.
        assert self.decode_text is not None
        text = self.decode_text(row.tokens)
        return any(s in text for s in stop_strings)

    def _finish(self, row: Row, reason: StopReason, done: list[tuple[int, SampleResult]]) -> None:
        self.cache.release(row.slot)
        state = row.job
        topk = row.topk if state.job.topk_sample_logprobs > 0 else None
        state.sequences[row.sample_index] = SampledSequence(row.tokens, row.logprobs, reason, topk)
        state.live.pop(row.sample_index, None)
        state.unfinished -= 1
        if state.unfinished == 0:
            self._finished_jobs[state.ticket] = state.job
            self._jobs.pop(state.ticket, None)
            sequences = [s for s in state.sequences if s is not None]
            done.append(
                (
                    state.ticket,
                    SampleResult(
                        sequences=sequences,
                        prompt_logprobs=state.prompt.prompt_logprobs,
                        topk_prompt_logprobs=state.prompt.topk,
                        target_prompt_logprobs=state.prompt.targets,
                        prompt_alt_tokens=state.prompt.alt,
                    ),
                )
            )
