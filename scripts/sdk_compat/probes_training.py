"""Probes of TrainingClient methods."""

from __future__ import annotations

from tinker import types

from scripts.sdk_compat.harness import (
    ADAM,
    Env,
    Invoke,
    check,
    check_checkpoint,
    check_forward,
    check_restored,
    check_sampler,
    datum,
    loss,
    probe,
    testing,
)


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
