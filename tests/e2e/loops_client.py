"""Drives tinkerd with the real Baseten Loops SDK; run in the Loops venv (Python 3.12), not in tinkerd's.

Usage: python loops_client.py <base_model> <out.json> [<download dir>]
Environment: LOOPS_BASE_URL, BASETEN_API_KEY, LOOPS_REQUEST_LOG (the SDK records every exchange there).
Writes what the SDK returned as JSON; the test (test_loops_sdk.py) checks it and the request log.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from baseten.loops import ServiceClient
from baseten.loops.helpers.datum import attach_reference_logprobs
from baseten.loops.models import AdamParams, Datum, ModelInput, SamplingParams, TensorData

PROMPT = [1, 330, 1345, 314, 260, 2593, 30, 216]  # token ids of SmolLM2's vocabulary
TARGETS = [*PROMPT[1:], 2]
READY_TIMEOUT = 60.0  # a wrong 4xx would otherwise be retried for an hour


def masked_datum() -> Datum:
    """cross_entropy with -100 marking the first three targets as masked, and no weights (the Loops docs' style)."""
    targets = [-100, -100, -100, *TARGETS[3:]]
    return Datum(
        model_input=ModelInput.from_ints(PROMPT),
        loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])},
    )


def weighted_datum() -> Datum:
    weights = [0.0, 0.0, 0.0] + [1.0] * (len(TARGETS) - 3)
    return Datum(
        model_input=ModelInput.from_ints(PROMPT),
        loss_fn_inputs={
            "target_tokens": TensorData(data=TARGETS, dtype="int64", shape=[len(TARGETS)]),
            "weights": TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def preference_pair(chosen: list[int], rejected: list[int]) -> list[Datum]:
    """A (chosen, rejected) pair of continuations of PROMPT: the targets are the answer's tokens, the prompt's and the
    last position (which predicts past the sequence, and gets no reference logprob) masked with -100."""
    out = []
    for answer in (chosen, rejected):
        tokens = [*PROMPT, *answer]
        targets = [-100] * (len(PROMPT) - 1) + [*answer, -100]
        out.append(
            Datum(
                model_input=ModelInput.from_ints(tokens),
                loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])},
            )
        )
    return out


def preference_and_rl(service: Any, base_model: str, out: dict[str, Any]) -> None:
    """DPO the way the SDK's helper does it (reference logprobs from a snapshot before any step), a dppo forward,
    and top_k_logprobs, on a run of their own."""
    tc = service.create_lora_training_client(base_model=base_model, rank=4, seed=1, ready_timeout=READY_TIMEOUT)
    reference = tc.save_weights_and_get_sampling_client("reference")
    pairs = attach_reference_logprobs(
        preference_pair([330, 1345, 314], [2593, 30, 216, 260]) + preference_pair([260, 2593], [314, 330]), reference
    )
    out["dpo"] = []
    for _ in range(4):
        step = tc.forward_backward(pairs, "dpo", {"beta": 0.5}).result()
        out["dpo"].append({"loss": step.loss, "metrics": step.metrics})
        # Adam's first steps are sign steps of the full learning rate on every B entry; a small one keeps each step
        # within first order on a random tiny model, so the loss falls every step.
        tc.optim_step(AdamParams(learning_rate=2e-3)).result()

    sampled = tc.save_weights_and_get_sampling_client("rl").sample(
        ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=SamplingParams(max_tokens=4, temperature=1.0)
    )
    answer, answer_logprobs = list(sampled.sequences[0].tokens), list(sampled.sequences[0].logprobs or [])
    tokens = [*PROMPT, *answer]
    n = len(tokens)
    behaviour = [0.0] * (len(PROMPT) - 1) + answer_logprobs + [0.0]
    advantages = [0.0] * (len(PROMPT) - 1) + [1.0] * len(answer) + [0.0]
    rl = Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": TensorData(data=[*tokens[1:], 2], dtype="int64", shape=[n]),
            "logprobs": TensorData(data=behaviour, dtype="float32", shape=[n]),
            "advantages": TensorData(data=advantages, dtype="float32", shape=[n]),
        },
    )
    dppo = tc.forward([rl], "dppo", {"dppo_mask_high": 0.2, "kl_tau": 0.01}).result()
    out["dppo"] = {"loss": dppo.loss, "metrics": dppo.metrics, "answer_logprobs": answer_logprobs,
                   "trainer_logprobs": dppo.loss_fn_outputs[0]["logprobs"].tolist()[len(PROMPT) - 1 : -1]}  # fmt: skip

    top = tc.forward([weighted_datum()], "cross_entropy", top_k_logprobs=3).result().loss_fn_outputs[0]
    out["top_k"] = {name: {"data": top[name].data, "shape": top[name].shape, "dtype": top[name].dtype}
                    for name in ("top_k_logprobs", "top_k_token_ids", "logprobs")}  # fmt: skip


def local_clients(base_model: str, out: dict[str, Any]) -> None:
    """``ServiceClient.local(trainer_url, sampler_url)``: a run and its paired sampler made over the control plane with
    plain HTTP, then driven by a local ServiceClient, which talks to those URLs only (no control plane)."""
    import httpx

    root = os.environ["LOOPS_BASE_URL"].rstrip("/")
    headers = {"Authorization": f"Api-Key {os.environ['BASETEN_API_KEY']}"}
    with httpx.Client(headers=headers, timeout=30) as http:
        session = http.post(f"{root}/v1/loops/sessions", json={}).json()["session"]["id"]
        body = {"session_id": session, "base_model": base_model, "lora_rank": 4}
        run = http.post(f"{root}/v1/loops/trainers", json=body).json()["run"]
        sampler = http.post(f"{root}/v1/loops/samplers", json={"session_id": session, "run_id": run["id"]}).json()
    local = ServiceClient.local(trainer_url=run["base_url"], sampler_url=sampler["sampler"]["base_url"])
    tc = local.create_lora_training_client(base_model=base_model, rank=4, ready_timeout=READY_TIMEOUT)
    losses = []
    for _ in range(3):
        losses.append(tc.forward_backward([weighted_datum()], "cross_entropy").result().loss)
        tc.optim_step(AdamParams(learning_rate=1e-3)).result()
    # A local TrainingClient has no run id, and the SDK refuses every save and load without one; its sampler URL is
    # sampled directly (the run has no sampler weights yet, so its paired sampler serves the base model).
    sampled = greedy(local.create_sampling_client(base_model=base_model, ready_timeout=READY_TIMEOUT))
    base = greedy(service_base_sampler(base_model))
    out["local"] = {"run_id": run["id"], "losses": losses, "sampled": sampled, "base": base}


def service_base_sampler(base_model: str) -> Any:
    return ServiceClient().create_sampling_client(base_model=base_model, ready_timeout=READY_TIMEOUT)


def greedy(sampler: Any) -> list[int]:
    params = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    response = sampler.sample(ModelInput.from_ints(PROMPT), num_samples=1, sampling_params=params)
    return list(response.sequences[0].tokens)


def main() -> None:
    base_model, out_path = sys.argv[1], Path(sys.argv[2])
    download_dir = Path(sys.argv[3]) if len(sys.argv) > 3 else out_path.parent / "download"
    out: dict[str, Any] = {}
    adam = AdamParams(learning_rate=0.02)

    service = ServiceClient()
    out["capabilities"] = [m.model_name for m in service.get_server_capabilities().supported_models]
    # Seeded adapters: the same trajectory on every run (an unseeded one draws its LoRA A at random, and whether eight
    # steps change a tiny random model's greedy continuation then varies from run to run).
    tc = service.create_lora_training_client(base_model=base_model, rank=4, seed=0, ready_timeout=READY_TIMEOUT)
    out["run_id"] = tc.run_id

    masked = tc.forward_backward([masked_datum()], "cross_entropy").result()
    weighted = tc.forward([weighted_datum()], "cross_entropy").result()
    out["masked_loss"], out["weighted_loss"] = masked.loss, weighted.loss
    out["masked_logprobs"] = masked.loss_fn_outputs[0]["logprobs"].tolist()
    raw = tc.forward([weighted_datum()], "cross_entropy", {"skip_token_normalization": True}).result()
    out["raw_loss"], out["raw_metrics"] = raw.loss, raw.metrics
    # The first step is small: Adam's first update is a sign step of the full learning rate on every zero-initialised
    # B entry, which at 0.02 can overshoot on a random tiny model; at 1e-3 the loss falls to first order.
    tc.optim_step(AdamParams(learning_rate=1e-3)).result()
    out["loss_after_step"] = tc.forward([weighted_datum()], "cross_entropy").result().loss

    s1 = tc.save_weights_and_get_sampling_client("step-1")
    out["s1_path"], out["s1_name"] = s1.checkpoint_path, s1.checkpoint_name
    out["s1_first"] = greedy(s1)

    for _ in range(8):
        tc.forward_backward([weighted_datum()], "cross_entropy").result()
        tc.optim_step(adam).result()
    out["loss_after_more_steps"] = tc.forward([weighted_datum()], "cross_entropy").result().loss
    s2 = tc.save_weights_and_get_sampling_client("step-2")
    out["s2_path"] = s2.checkpoint_path
    out["s1_again"], out["s2_first"] = greedy(s1), greedy(s2)
    out["standalone"] = greedy(service.create_sampling_client(model_path=s1.checkpoint_path))

    out["checkpoints"] = [
        {"name": c.checkpoint_id, "type": c.checkpoint_type, "target": c.target, "rank": c.lora_adapter_config.rank}
        for c in tc.list_checkpoints()
    ]
    pages: list[list[str]] = []
    token: int | None = 0
    total = None
    while token is not None:
        page = tc.get_checkpoint_archive_url(name=s1.checkpoint_name, page_size=1, page_token=token)
        pages.append([f.relative_file_name for f in page.presigned_urls])
        total, token = page.total_count, page.next_page_token
    out["pages"], out["total_count"] = pages, total
    download = tc.download_checkpoint(name=s1.checkpoint_name, dest_dir=str(download_dir))
    out["download"] = {"dir": str(download.dest_dir), "files": download.file_count, "bytes": download.bytes_written}

    state = tc.save_state("state-1").result()
    out["state_path"] = state.path
    before_load = tc.forward([weighted_datum()], "cross_entropy").result().loss
    tc.forward_backward([weighted_datum()], "cross_entropy").result()
    tc.optim_step(adam).result()
    out["moved_loss"] = tc.forward([weighted_datum()], "cross_entropy").result().loss
    out["load_step"] = tc.load_state_with_optimizer(state.path).result().step
    out["state_loss"], out["reloaded_loss"] = before_load, tc.forward([weighted_datum()], "cross_entropy").result().loss
    tc.forward_backward([weighted_datum()], "cross_entropy").result()
    tc.optim_step(adam).result()
    out["continued_loss"] = tc.forward([weighted_datum()], "cross_entropy").result().loss

    restored = service.create_training_client_from_state_with_optimizer(state.path)
    out["restored_run"] = restored.run_id
    out["restored_loss"] = restored.forward([weighted_datum()], "cross_entropy").result().loss

    preference_and_rl(service, base_model, out)
    local_clients(base_model, out)

    out_path.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
