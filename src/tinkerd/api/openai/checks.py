"""Parameters of OpenAI's API that tinkerd cannot honour: accepted at their neutral values, refused otherwise (a
400 naming the parameter), never silently ignored."""

from __future__ import annotations

from tinkerd.api.openai.errors import OpenAIError
from tinkerd.api.openai.schemas import SamplingFields


def refuse_unsupported(body: SamplingFields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value:
            raise OpenAIError(f"{name} is not supported by tinkerd; leave it unset or 0", param=name)
    if body.logit_bias:
        raise OpenAIError("logit_bias is not supported by tinkerd; leave it unset", param="logit_bias")
