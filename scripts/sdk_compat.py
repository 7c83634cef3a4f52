"""Which methods of the installed `tinker` SDK work against tinkerd: tries each one on a live server, prints Markdown.

    .venv/bin/python -m scripts.sdk_compat [--model DIR] [--out FILE] [--only Class.method ...]

The inventory is read from the installed SDK (every public method of ServiceClient, TrainingClient, SamplingClient
and RestClient, the sync and the *_async variant each), so a method a new SDK adds shows up as "untested" until a
probe for it is written here. Each probe calls the method through the SDK with sensible arguments against a
`tinkerd.running()` server and checks what came back (a result that is merely "no exception" is not enough):

- works: the call returned and its result checked out;
- fails: the call raised, or its result was wrong (the error is in the note);
- n/a: the method is about something tinkerd has no equivalent of (billing, a web console, JWT identities);
  it is still called, and the note says what it answered;
- untested: no probe knows how to call it.

By default the server serves a tiny random Llama with SmolLM2's tokenizer (taken from the tinkerd cache: run
`tinkerd models pull` once), so the whole table takes under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import inspect
import re
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import tinker
from tinker import types

CLASSES: tuple[type, ...] = (tinker.ServiceClient, tinker.TrainingClient, tinker.SamplingClient, tinker.RestClient)
ASYNC_SUFFIX = "_async"
PROBE_TIMEOUT_S = 180.0
API_KEY = "tml-compat"
PROMPT = [1, 17, 300, 4000, 42, 7, 99]
SMOLLM2_VOCAB = 49152

Status = Literal["works", "fails", "n/a", "untested"]


# -- the inventory -----------------------------------------------------------------------------------------------------


def public_methods(cls: type) -> list[str]:
    """Public callables of a class (functions, static and class methods), properties excluded."""
    names = []
    for name in dir(cls):
        if name.startswith("_"):
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, property):
            continue
        if isinstance(raw, staticmethod | classmethod) or callable(raw):
            names.append(name)
    return sorted(names)


def base_name(method: str) -> str:
    return method.removesuffix(ASYNC_SUFFIX)


def inventory(classes: tuple[type, ...] = CLASSES) -> list[str]:
    """Every public method of the SDK's client classes, as "Class.method"."""
    return [f"{cls.__name__}.{name}" for cls in classes for name in public_methods(cls)]


# -- calling a method, sync or async, and waiting for its result ----------------------------------------------------


class ProbeFailed(Exception):
    """The call returned, but not what it should have."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ProbeFailed(message)


def _settle(value: Any) -> Any:
    while isinstance(value, tinker.APIFuture | concurrent.futures.Future):
        value = value.result()
    return value


async def _settle_async(value: Any) -> Any:
    if inspect.isawaitable(value) and not isinstance(value, tinker.APIFuture):
        value = await value
    while isinstance(value, tinker.APIFuture | concurrent.futures.Future):
        value = await value if isinstance(value, tinker.APIFuture) else await asyncio.wrap_future(value)
    return value


Invoke = Callable[..., Any]  # invoke(receiver, *args, **kwargs): the method under test called, its result settled


def invoker(method: str) -> Invoke:
    is_async = method.endswith(ASYNC_SUFFIX)

    def invoke(receiver: Any, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(receiver, method)
        if is_async:

            async def run() -> Any:
                return await _settle_async(bound(*args, **kwargs))

            return asyncio.run(run())
        return _settle(bound(*args, **kwargs))

    return invoke


# -- what the probes share: clients, a trained run, its checkpoints ------------------------------------------------


def datum(tokens: list[int] = PROMPT) -> types.Datum:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


PROMPT_INPUT = types.ModelInput.from_ints(PROMPT)
ADAM = types.AdamParams(learning_rate=1e-2)


def loss(output: types.ForwardBackwardOutput) -> float:
    return output.metrics["loss:sum"]


@dataclass
class Env:
    base_url: str
    model: str
    _counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def unique(self, prefix: str) -> str:
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter}"

    def new_service(self) -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.base_url, api_key=API_KEY)

    @cached_property
    def service(self) -> tinker.ServiceClient:
        return self.new_service()

    @cached_property
    def rest(self) -> tinker.RestClient:
        return tinker.RestClient(base_url=self.base_url, api_key=API_KEY)

    def new_trainer(self) -> tinker.TrainingClient:
        return self.service.create_lora_training_client(base_model=self.model, rank=4, seed=0).result()

    @cached_property
    def trainer(self) -> tinker.TrainingClient:
        """A run one step away from its initialisation, with a saved state and a sampler checkpoint."""
        trainer = self.new_trainer()
        trainer.forward_backward([datum()], "cross_entropy").result()
        trainer.optim_step(ADAM).result()
        return trainer

    @cached_property
    def session_id(self) -> str:
        return self.trainer.model_id.split(":")[0]

    @cached_property
    def state(self) -> tuple[str, float]:
        """A weights/ checkpoint of `trainer` and the cross-entropy loss of `datum()` under it."""
        path = self.trainer.save_state("compat-state").result().path
        return path, loss(self.trainer.forward([datum()], "cross_entropy").result())

    @cached_property
    def sampler_path(self) -> str:
        return self.trainer.save_weights_for_sampler("compat-sampler").result().path

    @cached_property
    def sampler(self) -> tinker.SamplingClient:
        return self.service.create_sampling_client(base_model=self.model).result()

    def scratch_checkpoint(self) -> str:
        """A fresh weights/ checkpoint that a probe may change or delete."""
        return self.trainer.save_state(self.unique("compat-scratch")).result().path


def sampled(sampler: tinker.SamplingClient, num_samples: int = 1, max_tokens: int = 3) -> types.SampleResponse:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[])
    return sampler.sample(PROMPT_INPUT, num_samples=num_samples, sampling_params=params).result()


def check_samples(response: types.SampleResponse, num_samples: int = 1, max_tokens: int = 3) -> str:
    check(len(response.sequences) == num_samples, f"{len(response.sequences)} sequences, asked for {num_samples}")
    for sequence in response.sequences:
        check(len(sequence.tokens) == max_tokens, f"{len(sequence.tokens)} tokens, asked for {max_tokens}")
        check(all(0 <= t < SMOLLM2_VOCAB for t in sequence.tokens), f"tokens out of range: {sequence.tokens}")
    return f"{num_samples}×{max_tokens} tokens"


def check_sampler(sampler: Any) -> str:
    check(isinstance(sampler, tinker.SamplingClient), f"got {type(sampler).__name__}, not a SamplingClient")
    return "its sampler samples: " + check_samples(sampled(sampler))


def check_forward(output: types.ForwardBackwardOutput) -> float:
    logprobs = output.loss_fn_outputs[0]["logprobs"].tolist()
    check(len(logprobs) == len(PROMPT) - 1 and all(lp < 0 for lp in logprobs), f"logprobs {logprobs}")
    check(abs(loss(output) + sum(logprobs)) < 1e-3 * abs(loss(output)), "loss:sum is not -sum(logprobs)")
    return loss(output)


def check_restored(env: Env, trainer: Any) -> str:
    check(isinstance(trainer, tinker.TrainingClient), f"got {type(trainer).__name__}, not a TrainingClient")
    expected = env.state[1]
    got = loss(trainer.forward([datum()], "cross_entropy").result())
    check(abs(got - expected) <= 1e-3 * abs(expected), f"loss {got:.4f} after loading, {expected:.4f} when saved")
    return f"loss {got:.3f} = the saved state's"


def check_checkpoint(path: str, run: str, kind: str, name: str) -> str:
    check(path == f"tinker://{run}/{kind}/{name}", f"path {path}")
    return path.replace(run, "<run>")


def listed_checkpoint(env: Env, path: str) -> types.Checkpoint:
    listed = env.rest.list_checkpoints(env.trainer.model_id).result().checkpoints
    found = [c for c in listed if c.tinker_path == path]
    check(len(found) == 1, f"{path} listed {len(found)} times")
    return found[0]


# -- the probes: one per method, used for its sync and its async variant -------------------------------------------


class _Current(threading.local):
    method = ""  # the method this probe thread is testing, "Class.method"


_current = _Current()


def testing(prefix: str) -> bool:
    """Whether the running probe tests a method whose "Class.method" name starts so (for probes shared by several)."""
    return _current.method.startswith(prefix)


Probe = Callable[[Env, Invoke], str]
PROBES: dict[str, Probe] = {}
NOT_APPLICABLE: dict[str, str] = {}  # base "Class.method" -> why tinkerd has no equivalent; still probed


def probe(*names: str, na: str | None = None) -> Callable[[Probe], Probe]:
    def register(function: Probe) -> Probe:
        for name in names:
            PROBES[name] = function
            if na is not None:
                NOT_APPLICABLE[name] = na
        return function

    return register


# ServiceClient


@probe("ServiceClient.get_server_capabilities", "RestClient.get_server_capabilities")
def _capabilities(env: Env, invoke: Invoke) -> str:
    receiver = env.service if testing("ServiceClient.") else env.rest
    models = [m.model_name for m in invoke(receiver).supported_models]
    check(env.model in models, f"served models {models}")
    return f"{len(models)} model(s)"


@probe("ServiceClient.create_lora_training_client")
def _create_lora(env: Env, invoke: Invoke) -> str:
    trainer = invoke(env.service, base_model=env.model, rank=4, user_metadata={"probe": "yes"})
    check(isinstance(trainer, tinker.TrainingClient), f"got {type(trainer).__name__}")
    info = trainer.get_info()
    check(info.lora_rank == 4 and info.model_data.model_name == env.model, f"get_info {info}")
    return f"rank {info.lora_rank}"


@probe("ServiceClient.create_training_client_from_state")
def _from_state(env: Env, invoke: Invoke) -> str:
    return check_restored(env, invoke(env.service, env.state[0]))


@probe("ServiceClient.create_training_client_from_state_with_optimizer")
def _from_state_opt(env: Env, invoke: Invoke) -> str:
    trainer = invoke(env.service, env.state[0])
    note = check_restored(env, trainer)
    trainer.forward_backward([datum()], "cross_entropy").result()
    trainer.optim_step(ADAM).result()
    return note + "; trains on"


@probe("ServiceClient.create_sampling_client")
def _service_sampler(env: Env, invoke: Invoke) -> str:
    check_sampler(invoke(env.service, base_model=env.model))
    by_path = invoke(env.service, model_path=env.sampler_path)
    return "of the base model and of a sampler checkpoint; " + check_sampler(by_path)


@probe("ServiceClient.create_rest_client")
def _create_rest(env: Env, invoke: Invoke) -> str:
    rest = invoke(env.service)
    check(isinstance(rest, tinker.RestClient), f"got {type(rest).__name__}")
    runs = rest.list_training_runs().result().training_runs
    return f"lists {len(runs)} run(s)"


def _session_of(service: tinker.ServiceClient, env: Env) -> str:
    """Open the client's session (by creating a run in it) and return its id."""
    return service.create_lora_training_client(base_model=env.model, rank=4).result().model_id.split(":")[0]


@probe("ServiceClient.close")
def _close(env: Env, invoke: Invoke) -> str:
    import httpx

    service = env.new_service()
    session_id = _session_of(service, env)
    invoke(service, "success")
    # A finished session refuses heartbeats (410), which is what stops other clients of it.
    beat = httpx.post(
        f"{env.base_url}/api/v1/session_heartbeat", json={"session_id": session_id}, headers={"X-API-Key": API_KEY}
    )
    check(beat.status_code == 410, f"a heartbeat after close answered {beat.status_code}")
    return "the session is finished (heartbeats get 410)"


@probe("ServiceClient.copy_weights", "RestClient.copy_weights")
def _copy_weights(env: Env, invoke: Invoke) -> str:
    # The copy goes into a project: the ServiceClient's own, or one the RestClient names.
    if testing("ServiceClient."):
        service = tinker.ServiceClient(base_url=env.base_url, api_key=API_KEY, project_id="compat-project")
        copied = invoke(service, env.state[0])
    else:
        copied = invoke(env.rest, env.state[0], destination_project_id="compat-project")
    check(isinstance(copied, str) and copied.startswith("tinker://"), f"returned {copied!r}")
    return f"copied to {copied}"


def _neg_ll(logprobs: Any, weights: Any) -> tuple[Any, dict[str, Any]]:
    value = -(logprobs * weights).sum()
    return value, {"custom/neg_ll:sum": value}


@probe("ServiceClient.create_custom_loss")
def _create_custom_loss(env: Env, invoke: Invoke) -> str:
    handle = invoke(env.service, _neg_ll, {"logprobs": 1, "weights": 1})
    trainer = env.new_trainer()
    reference = loss(trainer.forward([datum()], "cross_entropy").result())
    out = trainer.forward_backward_custom([datum()], handle).result()
    got = out.metrics.get("custom/neg_ll:sum")
    check(got is not None and abs(got - reference) < 1e-2 * abs(reference), f"custom metrics {out.metrics}")
    return f"the handle's loss {got:.3f} = cross-entropy {reference:.3f}"


@probe("ServiceClient.get_console_url", "TrainingClient.get_console_url", na="a link into Thinking Machines' console")
def _console(env: Env, invoke: Invoke) -> str:
    receiver = env.service if testing("ServiceClient.") else env.trainer
    return f"client-side: {invoke(receiver)}"


@probe("ServiceClient.get_telemetry", "TrainingClient.get_telemetry", "SamplingClient.get_telemetry",
       "RestClient.get_telemetry")  # fmt: skip
def _telemetry(env: Env, invoke: Invoke) -> str:
    receivers = {"Service": env.service, "Training": env.trainer, "Sampling": env.sampler, "Rest": env.rest}
    receiver = next(r for prefix, r in receivers.items() if testing(prefix))
    value = invoke(receiver)
    return f"client-side: {type(value).__name__}"


# TrainingClient


@probe("TrainingClient.forward")
def _forward(env: Env, invoke: Invoke) -> str:
    return f"loss {check_forward(invoke(env.trainer, [datum()], 'cross_entropy')):.3f}"


@probe("TrainingClient.forward_backward", "TrainingClient.optim_step")
def _train_step(env: Env, invoke: Invoke) -> str:
    trainer = env.new_trainer()
    before = loss(trainer.forward([datum()], "cross_entropy").result())
    if testing("TrainingClient.forward_backward"):
        out = invoke(trainer, [datum()], "cross_entropy")
        check(abs(check_forward(out) - before) < 1e-2 * before, "forward_backward's loss is not forward's")
        trainer.optim_step(ADAM).result()
    else:
        trainer.forward_backward([datum()], "cross_entropy").result()
        step = invoke(trainer, ADAM)
        check(isinstance(step, types.OptimStepResponse), f"got {type(step).__name__}")
    after = loss(trainer.forward([datum()], "cross_entropy").result())
    check(after < before, f"loss {before:.3f} -> {after:.3f} after a step")
    return f"loss {before:.3f} -> {after:.3f}"


@probe("TrainingClient.forward_backward_custom")
def _custom(env: Env, invoke: Invoke) -> str:
    import torch

    def custom(data: list[types.Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        value = -torch.stack([lp.sum() for lp in logprobs]).sum()
        return value, {"neg_ll": float(value)}

    reference = loss(env.trainer.forward([datum()], "cross_entropy").result())
    out = invoke(env.trainer, [datum()], custom)
    got = out.metrics.get("neg_ll")
    check(got is not None and abs(got - reference) < 1e-2 * abs(reference), f"metrics {out.metrics}")
    return f"client-side loss {got:.3f} = cross-entropy"


@probe("TrainingClient.get_info")
def _get_info(env: Env, invoke: Invoke) -> str:
    info = invoke(env.trainer)
    check(info.model_data.model_name == env.model and info.lora_rank == 4, f"{info}")
    return f"model {info.model_data.model_name.rsplit('/', 1)[-1]}, rank {info.lora_rank}"


@probe("TrainingClient.get_tokenizer", "SamplingClient.get_tokenizer")
def _tokenizer(env: Env, invoke: Invoke) -> str:
    receiver = env.trainer if testing("TrainingClient.") else env.sampler
    tokens = invoke(receiver).encode("hello world")
    check(len(tokens) > 0, "empty encoding")
    return f"loads offline ({len(tokens)} tokens for 'hello world')"


@probe("TrainingClient.load_state", "TrainingClient.load_state_with_optimizer")
def _load_state(env: Env, invoke: Invoke) -> str:
    trainer = env.new_trainer()
    result = invoke(trainer, env.state[0])
    check(isinstance(result, types.LoadWeightsResponse), f"got {type(result).__name__}")
    return check_restored(env, trainer)


@probe("TrainingClient.save_state")
def _save_state(env: Env, invoke: Invoke) -> str:
    name = env.unique("compat-save")
    saved = invoke(env.trainer, name, ttl_seconds=3600, user_metadata={"probe": "yes"})
    return check_checkpoint(saved.path, env.trainer.model_id, "weights", name)


@probe("TrainingClient.save_weights_for_sampler")
def _save_sampler(env: Env, invoke: Invoke) -> str:
    name = env.unique("compat-sampler")
    saved = invoke(env.trainer, name)
    return check_checkpoint(saved.path, env.trainer.model_id, "sampler_weights", name)


@probe("TrainingClient.save_weights_and_get_sampling_client")
def _save_and_sample(env: Env, invoke: Invoke) -> str:
    return check_sampler(invoke(env.trainer))


@probe("TrainingClient.create_sampling_client")
def _trainer_sampler(env: Env, invoke: Invoke) -> str:
    return check_sampler(invoke(env.trainer, env.sampler_path))


@probe("TrainingClient.save_weights_external")
def _save_external(env: Env, invoke: Invoke) -> str:
    trainer = env.new_trainer()  # its own run: should the call be refused, no other probe's run is involved
    name = env.unique("compat-external")
    saved = invoke(trainer, name)
    return check_checkpoint(saved.path, trainer.model_id, "external_weights", name)


# SamplingClient


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


# RestClient: runs, checkpoints, sessions, samplers


@probe("RestClient.list_training_runs")
def _list_runs(env: Env, invoke: Invoke) -> str:
    runs = invoke(env.rest, limit=100).training_runs
    ids = [r.training_run_id for r in runs]
    check(env.trainer.model_id in ids, f"{env.trainer.model_id} not in {ids}")
    return f"{len(ids)} run(s)"


@probe("RestClient.get_training_run", "RestClient.get_training_run_by_tinker_path")
def _get_run(env: Env, invoke: Invoke) -> str:
    by_path = testing("RestClient.get_training_run_by_tinker_path")
    run = invoke(env.rest, env.state[0] if by_path else env.trainer.model_id)
    check(run.training_run_id == env.trainer.model_id and run.base_model == env.model, f"{run}")
    check(run.lora_rank == 4, f"lora_rank {run.lora_rank}")
    return "base model, rank, last checkpoint"


@probe("RestClient.get_weights_info_by_tinker_path")
def _weights_info(env: Env, invoke: Invoke) -> str:
    info = invoke(env.rest, env.state[0])
    check(info.base_model == env.model and info.lora_rank == 4, f"{info}")
    return "base model and LoRA shape"


@probe("RestClient.list_checkpoints", "RestClient.list_user_checkpoints")
def _list_checkpoints(env: Env, invoke: Invoke) -> str:
    path = env.state[0]
    if testing("RestClient.list_user_checkpoints"):
        listed = invoke(env.rest, limit=1000).checkpoints
    else:
        listed = invoke(env.rest, env.trainer.model_id).checkpoints
    paths = [c.tinker_path for c in listed]
    check(path in paths, f"{path} not in {paths}")
    return f"{len(paths)} checkpoint(s)"


@probe("RestClient.set_checkpoint_ttl_from_tinker_path")
def _ttl(env: Env, invoke: Invoke) -> str:
    path = env.scratch_checkpoint()
    invoke(env.rest, path, 3600)
    listed = listed_checkpoint(env, path)
    expires = listed.expires_at
    check(expires is not None, "no expires_at after setting a TTL")
    assert expires is not None
    soon = datetime.now(UTC) + timedelta(hours=2)
    check(expires.astimezone(UTC) < soon, f"expires_at {expires}")
    return "expires_at set"


@probe("RestClient.delete_checkpoint", "RestClient.delete_checkpoint_from_tinker_path")
def _delete(env: Env, invoke: Invoke) -> str:
    path = env.scratch_checkpoint()
    if testing("RestClient.delete_checkpoint_from_tinker_path"):
        invoke(env.rest, path)
    else:
        invoke(env.rest, env.trainer.model_id, path.split(f"{env.trainer.model_id}/", 1)[1])
    paths = [c.tinker_path for c in env.rest.list_checkpoints(env.trainer.model_id).result().checkpoints]
    check(path not in paths, f"{path} still listed")
    return "gone from the list"


@probe("RestClient.publish_checkpoint_from_tinker_path", "RestClient.unpublish_checkpoint_from_tinker_path")
def _publish(env: Env, invoke: Invoke) -> str:
    path = env.scratch_checkpoint()
    publish = testing("RestClient.publish")
    if not publish:
        env.rest.publish_checkpoint_from_tinker_path(path).result()
    invoke(env.rest, path)
    listed = listed_checkpoint(env, path)
    check(listed.public == publish, f"public={listed.public}")
    return f"public={listed.public}"


@probe("RestClient.get_external_weights_urls")
def _external_urls(env: Env, invoke: Invoke) -> str:
    path = env.new_trainer().save_weights_external(env.unique("compat-external")).result().path
    urls = invoke(env.rest, path).urls
    check(len(urls) > 0, "no URLs")
    return f"{len(urls)} URL(s)"


@probe("RestClient.get_sampler")
def _get_sampler(env: Env, invoke: Invoke) -> str:
    sampler_id = env.sampler._sampling_session_id  # the SDK keeps the id private
    got = invoke(env.rest, sampler_id)
    check(got.sampler_id == sampler_id and got.base_model == env.model, f"{got}")
    return "id and base model"


@probe("RestClient.get_session")
def _get_session(env: Env, invoke: Invoke) -> str:
    got = invoke(env.rest, env.session_id)
    check(env.trainer.model_id in got.training_run_ids, f"{got}")
    return f"{len(got.training_run_ids)} run(s), {len(got.sampler_ids)} sampler(s)"


@probe("RestClient.list_sessions")
def _list_sessions(env: Env, invoke: Invoke) -> str:
    sessions = invoke(env.rest, limit=100).sessions
    check(env.session_id in sessions, f"{env.session_id} not in {sessions}")
    return f"{len(sessions)} session(s)"


@probe("RestClient.search_sessions")
def _search_sessions(env: Env, invoke: Invoke) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = invoke(env.rest, types.SessionSearchRequest(session_id=env.session_id))
    found = [s.session_id for s in page.sessions]
    check(found == [env.session_id], f"found {found}")
    return "by session id"


@probe("RestClient.assign_session_project")
def _assign_project(env: Env, invoke: Invoke) -> str:
    run = env.new_service().create_lora_training_client(base_model=env.model, rank=4).result().model_id
    project = env.unique("compat-project")
    invoke(env.rest, run.split(":")[0], project)
    listed = [
        r.training_run_id for r in env.rest.list_training_runs(limit=100, project_id=project).result().training_runs
    ]
    check(listed == [run], f"the project lists runs {listed}, not the session's {run}")
    return "the session's run is listed in the project"


@probe("RestClient.export_session_trace", na="session traces are a hosted-Tinker observability feature")
def _trace(env: Env, invoke: Invoke) -> str:
    return f"returned {invoke(env.rest, env.session_id)!r}"


@probe("RestClient.get_billing_usage", na="billing")
def _billing(env: Env, invoke: Invoke) -> str:
    now = datetime.now(UTC)
    return f"returned {type(invoke(env.rest, now - timedelta(days=1), now)).__name__}"


def _no_arguments(env: Env, invoke: Invoke) -> str:
    return f"returned {invoke(env.rest)!r}"


probe("RestClient.get_audit_log", na="organization audit logs")(_no_arguments)
probe("RestClient.get_current_checkpoint_storage_usage", na="billing (storage usage)")(_no_arguments)
probe("RestClient.whoami", na="identities come from JWTs; tinkerd uses plain API keys")(_no_arguments)


# -- running the probes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    method: str  # "Class.method"
    status: Status
    note: str


_SESSION_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def _one_line(text: str, limit: int = 160) -> str:
    """A table cell: one line, pipes escaped, session ids replaced (so that tables of two runs compare)."""
    text = _SESSION_ID.sub("<session>", " ".join(str(text).split())).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(error: BaseException) -> str:
    if isinstance(error, ProbeFailed):
        return f"wrong result: {error}"
    if isinstance(error, tinker.APIStatusError):
        body = error.body
        message = body.get("error") if isinstance(body, dict) else None
        return f"HTTP {error.status_code}: {message or error.message}"
    return f"{type(error).__name__}: {error}"


def run_probe(env: Env, method: str) -> Outcome:
    base = base_name(method)
    probe_fn = PROBES.get(base)
    if probe_fn is None:
        return Outcome(method, "untested", "no probe knows this method yet")
    result: dict[str, Any] = {}

    def target() -> None:
        _current.method = method
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecations of the older spellings are the point of calling them
                result["note"] = probe_fn(env, invoker(method.split(".", 1)[1]))
        except BaseException as error:  # everything a call can raise is a finding, not a crash of the table
            result["error"] = error

    thread = threading.Thread(target=target, name=f"probe {method}", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    na = NOT_APPLICABLE.get(base)
    if thread.is_alive():
        return Outcome(method, "n/a" if na else "fails", f"no answer within {PROBE_TIMEOUT_S:.0f} s")
    if "error" in result:
        detail = _describe(result["error"])
        return Outcome(method, "n/a", f"{na}; it answers {detail}") if na else Outcome(method, "fails", detail)
    return Outcome(method, "n/a", f"{na}; {result['note']}") if na else Outcome(method, "works", result["note"])


def run_all(env: Env, methods: list[str]) -> list[Outcome]:
    outcomes = []
    for method in methods:
        outcome = run_probe(env, method)
        print(f"{outcome.status:9} {method}: {_one_line(outcome.note, 100)}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    return outcomes


def markdown(outcomes: list[Outcome]) -> str:
    """One row per method name, sync and *_async side by side (with one note when both fared alike)."""
    by_method = {o.method: o for o in outcomes}
    rows: dict[str, dict[str, Outcome]] = {}
    for outcome in outcomes:
        cls, name = outcome.method.split(".", 1)
        variant = "async" if name.endswith(ASYNC_SUFFIX) else "sync"
        rows.setdefault(f"{cls}.{base_name(name)}", {})[variant] = outcome
    lines = ["| method | sync | async | notes |", "|---|---|---|---|"]
    for key, variants in rows.items():
        sync, async_ = variants.get("sync"), variants.get("async")
        if sync is not None and async_ is not None and sync.status != async_.status:
            note = f"sync: {sync.note}; async: {async_.note}"
        else:
            note = (sync or async_ or Outcome(key, "untested", "")).note  # the same verdict: the sync one's note
        cells = [variants[v].status if v in variants else "—" for v in ("sync", "async")]
        note = _one_line(note)
        lines.append(f"| `{key}` | {cells[0]} | {cells[1]} | {note} |")
    counts = {s: sum(1 for o in by_method.values() if o.status == s) for s in ("works", "fails", "n/a", "untested")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return "\n".join(lines) + f"\n\n{len(by_method)} methods (sync and async counted apart): {summary}.\n"


# -- the server --------------------------------------------------------------------------------------------------------


def tiny_model_dir(root: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and vocabulary (the tokenizer from the tinkerd cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.engine.tiny_models import tiny_config
    from tinkerd import hub
    from tinkerd.settings import Settings

    source = hub.model_dir(Settings.load().cache_dir, hub.DEFAULT_MODEL)
    if not (source / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer at {source}: run `tinkerd models pull` once, or pass --model DIR")
    out = root / "tiny-smollm2"
    config = tiny_config("llama", vocab_size=SMOLLM2_VOCAB)
    config.max_position_embeddings = 512
    config.eos_token_id = 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


@contextmanager
def live_server(model: str | None) -> Iterator[tuple[str, str]]:
    """(base URL, served model name) of an in-process tinkerd."""
    import tinkerd

    with tempfile.TemporaryDirectory(prefix="sdk-compat-") as scratch:
        model = model or str(tiny_model_dir(Path(scratch)))
        with tinkerd.running(model=model, data_dir=Path(scratch) / "data") as base_url:
            yield base_url, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--model", help="a local HF model directory to serve (default: a tiny random Llama)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--only", nargs="*", default=None, help="probe only these Class.method names")
    args = parser.parse_args(argv)
    methods = inventory()
    if args.only:
        methods = [m for m in methods if m in args.only or base_name(m) in args.only]
    with live_server(args.model) as (base_url, model):
        outcomes = run_all(Env(base_url, model), methods)
    table = f"`tinker` {tinker.__version__} against tinkerd:\n\n" + markdown(outcomes)
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
