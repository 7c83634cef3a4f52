"""Probes of ServiceClient methods."""

from __future__ import annotations

from typing import Any

import tinker

from scripts.sdk_compat.harness import (
    ADAM,
    API_KEY,
    Env,
    Invoke,
    check,
    check_restored,
    check_sampler,
    datum,
    loss,
    probe,
    testing,
)


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
    run, kind, _ = copied.removeprefix("tinker://").split("/")
    listed = [c.tinker_path for c in env.rest.list_checkpoints(run).result().checkpoints]
    check(listed == [copied] and kind == "weights", f"the copy's run lists {listed}")
    check(run != env.state[0].removeprefix("tinker://").split("/")[0], "the copy belongs to the source's run")
    return f"copied to {copied}, a new run's only checkpoint"


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
