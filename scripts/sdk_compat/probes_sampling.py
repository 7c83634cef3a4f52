"""Probes of SamplingClient methods."""

from __future__ import annotations

import tinker
from tinker import types

from scripts.sdk_compat.harness import (
    API_KEY,
    PROMPT,
    PROMPT_INPUT,
    Env,
    Invoke,
    check,
    check_sampler,
    check_samples,
    probe,
    testing,
)


@probe("SamplingClient.sample")
def _sample(env: Env, invoke: Invoke) -> str:
    params = types.SamplingParams(max_tokens=3, temperature=0.0, stop=[])
    response = invoke(env.sampler, PROMPT_INPUT, num_samples=2, sampling_params=params, include_prompt_logprobs=True)
    note = check_samples(response, num_samples=2)
    prompt_logprobs = response.prompt_logprobs or []
    check(len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None, f"prompt_logprobs {prompt_logprobs}")
    return note + ", prompt logprobs"


@probe("SamplingClient.compute_logprobs")
def _compute_logprobs(env: Env, invoke: Invoke) -> str:
    logprobs = invoke(env.sampler, PROMPT_INPUT)
    check(len(logprobs) == len(PROMPT) and logprobs[0] is None, f"logprobs {logprobs}")
    check(all(lp is not None and lp < 0 for lp in logprobs[1:]), f"logprobs {logprobs}")
    return f"{len(logprobs)} logprobs"


@probe("SamplingClient.create")
def _sampling_create(env: Env, invoke: Invoke) -> str:
    return check_sampler(invoke(tinker.SamplingClient, env.service.holder, base_model=env.model))


@probe("SamplingClient.get_base_model")
def _base_model(env: Env, invoke: Invoke) -> str:
    got = invoke(env.sampler)
    check(got == env.model, f"{got!r}")
    return "the served model's name"


@probe("SamplingClient.get_sampler_handle", "SamplingClient.from_sampler_handle")
def _handles(env: Env, invoke: Invoke) -> str:
    if testing("SamplingClient.get_sampler_handle"):
        handle = invoke(env.sampler)
        check(isinstance(handle, str) and len(handle) > 0, f"{handle!r}")
        return "client-side: a string handle"
    handle = env.sampler.get_sampler_handle()
    return "client-side; " + check_sampler(invoke(tinker.SamplingClient, handle, api_key=API_KEY))


@probe("SamplingClient.on_queue_state_change", na="a hook the SDK calls when a queue-state header arrives")
def _queue_state(env: Env, invoke: Invoke) -> str:
    from tinker.lib.api_future_impl import QueueState

    invoke(env.sampler, QueueState.ACTIVE, None)
    return "client-side logging only"
