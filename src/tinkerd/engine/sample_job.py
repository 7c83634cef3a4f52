"""One sampling request as every sampler backend takes it (the builtin ``Sampler``, its generic-path subclass and the
vLLM backend): a prompt, its sampling parameters, how many samples, which adapter, and the logprobs it asks for.
``sampling_validation.validate_job`` checks one against the model before it queues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tinkerd.domain.ops import CellGrid, ImageInput, SamplingParams
from tinkerd.engine import prompt_scoring
from tinkerd.engine.lora import LoraWeights


@dataclass(frozen=True, eq=False)
class SampleJob:
    """One sampling request: ``num_samples`` continuations of ``prompt`` through ``weights`` (None: the base)."""

    prompt: list[int]
    params: SamplingParams
    num_samples: int
    weights: LoraWeights | None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_logprobs_last_n: int | None = None
    target_prompt_logprobs: CellGrid | None = None  # int ids; row i = prompt position i + 1
    prompt_alt_tokens_k: int = 0
    images: Sequence[ImageInput] = ()  # a vision-language model's images in the prompt (generic path only)

    def prompt_questions(self) -> prompt_scoring.PromptQuestions:
        return prompt_scoring.PromptQuestions(
            prompt_logprobs=self.prompt_logprobs,
            topk=self.topk_prompt_logprobs,
            last_n=self.prompt_logprobs_last_n,
            targets=self.target_prompt_logprobs,
            alt_k=self.prompt_alt_tokens_k,
        )

    def reports_otherwise(self) -> bool:
        """Whether its sampled tokens need more than ``sample_tokens`` reports (another distribution, top-k lists)."""
        return self.topk_sample_logprobs > 0 or self.params.logprobs_of != "tempered"
