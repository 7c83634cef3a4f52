"""Probes of RestClient methods: runs, checkpoints, sessions, samplers, projects, and the hosted-only ones."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta

from tinker import types

from scripts.sdk_compat.harness import (
    Env,
    Invoke,
    check,
    listed_checkpoint,
    probe,
    testing,
)


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
