"""The continuous-batching ``Sampler``'s bookkeeping: a request in flight (``JobState``) and each of its samples
while it decodes in a KV cache slot (``Row``). Plain records; the ``Sampler`` (and ``GenericSampler``) move them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tinkerd.domain.ops import SampledSequence, TopkRow
from tinkerd.engine import prompt_scoring
from tinkerd.engine.sample_job import SampleJob


@dataclass(eq=False)
class JobState:
    ticket: int
    job: SampleJob
    sequences: list[SampledSequence | None]
    stop_ids: frozenset[int]
    next_sample: int = 0  # samples [0, next_sample) have a slot
    unfinished: int = 0
    # the prefilled prompt, kept until every sample has been copied into a slot
    k_L_G_P_D: torch.Tensor | None = None
    v_L_G_P_D: torch.Tensor | None = None
    # a hybrid model's delta-net layers after the prompt: convolution windows and recurrent states (hybrid_sampler)
    delta_net: tuple[torch.Tensor, torch.Tensor] | None = None
    last_logits_1_V: torch.Tensor | None = None
    prompt: prompt_scoring.PromptAnswers = field(default_factory=prompt_scoring.PromptAnswers)
    live: dict[int, Row] = field(default_factory=dict)  # sample index -> its row, while it decodes

    def own_prompt(self) -> None:
        """Keep the prefilled prompt as copies of its own, so the batch's packed tensors can be freed."""
        assert self.k_L_G_P_D is not None and self.v_L_G_P_D is not None
        self.k_L_G_P_D, self.v_L_G_P_D = self.k_L_G_P_D.contiguous(), self.v_L_G_P_D.contiguous()
        if self.delta_net is not None:
            self.delta_net = (self.delta_net[0].contiguous(), self.delta_net[1].contiguous())

    def drop_prompt(self) -> None:
        """Every sample has its copy of the prefilled prompt now."""
        self.k_L_G_P_D = self.v_L_G_P_D = None
        self.delta_net = None


@dataclass(eq=False)
class Row:
    """One live sequence: a sample of a job, in a KV cache slot."""

    job: JobState
    sample_index: int
    slot: int
    uniforms: list[float]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[TopkRow] = field(default_factory=list)

    @property
    def position(self) -> int:
        """Where the last sampled token goes when it is fed back in."""
        return len(self.job.job.prompt) + len(self.tokens) - 1
