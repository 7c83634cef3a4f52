"""What every probe shares: the inventory of SDK methods, calling one (sync or async) and settling its result, the
clients, trained run and checkpoints the probes use, the checks, and the probe registry."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
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


current_probe = _Current()


def testing(prefix: str) -> bool:
    """Whether the running probe tests a method whose "Class.method" name starts so (for probes shared by several)."""
    return current_probe.method.startswith(prefix)


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
