"""Restarts lose nothing: stop `tinkerd serve` mid-training (SIGTERM, then kill -9) and start it again on the same
data directory and port.

What must hold afterwards: every saved checkpoint lists and loads, runs keep their metadata, a client resumes from
its last save_state and reaches the loss of a run that was never interrupted, the futures in flight at the stop end
with a result or a clear error through the SDK (never hang: every wait is bounded), and the old run's sequence does
not stall its client's next request.
"""

from __future__ import annotations

import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types
from typer.testing import CliRunner

from tests.e2e.conftest import API_KEY, Server, start_server, stop_server
from tinkerd.cli import app

pytestmark = pytest.mark.e2e

WAIT_S = 120.0  # bound on every SDK wait: a hang fails the test instead of stalling it
STEPS = 6
FIRST_SAVE = 2  # the run saves its state after this many steps, then the server gets SIGTERM
SECOND_SAVE = 4  # the resumed run saves again after this many steps in all, then the server is killed
SEED = 7
LEARNING_RATE = 1e-2
BACKLOG = 6  # training steps (and samples) in flight when the server stops


def batch(step: int, size: int = 2, length: int = 24) -> list[types.Datum]:
    """The step's training data: fixed token sequences, so two runs see exactly the same batches."""
    datums: list[types.Datum] = []
    for row in range(size):
        tokens = [(step * 7919 + row * 104729 + i * 613) % 40000 + 100 for i in range(length)]
        weights = [1.0] * (length - 1)
        datums.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[length - 1]),
                    "weights": types.TensorData(data=weights, dtype="float32", shape=[length - 1]),
                },
            )
        )
    return datums


def train(training: tinker.TrainingClient, steps: range) -> None:
    for step in steps:
        # two batches taking turns: loss on them falls fast, yet each step's data depends on the step's index
        training.forward_backward(batch(step % 2), "cross_entropy").result(WAIT_S)
        training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)).result(WAIT_S)


def eval_loss(training: tinker.TrainingClient) -> float:
    return training.forward(batch(0), "cross_entropy").result(WAIT_S).metrics["loss:sum"]


def outcome(future: Any) -> str:
    """'ok', or the error message a user sees; raises if the SDK did not settle it within WAIT_S."""
    try:
        future.result(WAIT_S)
    except tinker.RequestFailedError as error:
        return str(error)
    return "ok"


class Clients:
    """The SDK clients a test opens, closed (bounded) before its servers stop."""

    def __init__(self) -> None:
        self.services: list[tinker.ServiceClient] = []

    def service(self, url: str) -> tinker.ServiceClient:
        client = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        self.services.append(client)
        return client

    def close(self) -> None:
        for client in self.services:
            with contextlib.suppress(Exception):  # saying goodbye is not what these tests check
                client.close("success").result(10)


def _restart(server: Server, tmp_path: Path, model_dir: Path, how: signal.Signals) -> Server:
    """Stop ``server`` with ``how`` and start a new one on the same data dir (tmp_path/data) and port."""
    if how is signal.SIGTERM:
        assert stop_server(server.process) == 0  # a clean stop on SIGTERM
    else:
        server.process.send_signal(how)
        server.process.wait(30)
    server.log.rename(tmp_path / f"serve-until-{how.name}.log")
    return start_server(tmp_path, model_dir, port=int(server.url.rsplit(":", 1)[1]))


def _submit_backlog(training: tinker.TrainingClient, sampler: tinker.SamplingClient, first_step: int) -> list[Any]:
    """Training steps and samples in flight; returns once the first has finished, so the worker is mid-backlog."""
    futures: list[Any] = []
    params = types.SamplingParams(max_tokens=32, temperature=1.0, seed=5, stop=[])
    for step in range(first_step, first_step + BACKLOG):
        futures.append(training.forward_backward(batch(step, size=4, length=128), "cross_entropy"))
        futures.append(training.optim_step(types.AdamParams(learning_rate=LEARNING_RATE)))
        futures.append(sampler.sample(batch(step)[0].model_input, num_samples=2, sampling_params=params))
    futures[0].result(WAIT_S)
    return futures


def _check_settled(futures: list[Any], *, samples_survive: bool) -> None:
    """Every future in flight at the stop ends: with its result, or with an error that says what happened."""
    outcomes = [outcome(f) for f in futures]
    training_outcomes = [o for i, o in enumerate(outcomes) if i % 3 != 2]
    assert any(o != "ok" for o in training_outcomes), "the stop interrupted nothing; make the backlog bigger"
    for message in (o for o in outcomes if o != "ok"):
        assert "restarted" in message or "not loaded on this server" in message, message
    if samples_survive:  # a graceful stop puts claimed work back; a sampler checkpoint is on disk, so it completes
        assert all(o == "ok" for i, o in enumerate(outcomes) if i % 3 == 2), outcomes


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _check_stored(rest: tinker.RestClient, run_id: str, metadata: dict[str, str], paths: set[str]) -> None:
    run = rest.get_training_run(run_id).result(WAIT_S)
    assert run.user_metadata == metadata and run.lora_rank == 4
    assert {c.tinker_path for c in rest.list_checkpoints(run_id).result(WAIT_S).checkpoints} == paths


def test_restarts_after_sigterm_and_kill_9_lose_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    clients = Clients()
    servers = [start_server(tmp_path, tiny_model_dir)]
    try:
        # -- first server: train, save, and stop it gracefully in the middle of more training and sampling
        service = clients.service(servers[0].url)
        training = service.create_lora_training_client(
            base_model=servers[0].model, rank=4, seed=SEED, user_metadata={"purpose": "restart"}
        ).result(WAIT_S)
        train(training, range(FIRST_SAVE))
        first_state = training.save_state(f"step-{FIRST_SAVE}").result(WAIT_S).path
        sampler_path = training.save_weights_for_sampler("sampler").result(WAIT_S).path
        loss_at_first_save = eval_loss(training)
        sampler = service.create_sampling_client(model_path=sampler_path).result(WAIT_S)
        backlog = _submit_backlog(training, sampler, FIRST_SAVE)

        servers.append(_restart(servers[0], tmp_path, tiny_model_dir, signal.SIGTERM))

        _check_settled(backlog, samples_survive=True)
        # The old run's sequence went on past every failed request: its next one is answered at once, clearly.
        with pytest.raises(tinker.RequestFailedError, match="not loaded on this server"):
            training.forward(batch(0), "cross_entropy").result(WAIT_S)
        rest = tinker.RestClient(base_url=servers[1].url, api_key=API_KEY)
        _check_stored(rest, training.model_id, {"purpose": "restart"}, {first_state, sampler_path})

        # -- second server: the user's script resumes from the saved state, saves again, and the server is killed
        resumed = clients.service(servers[1].url).create_training_client_from_state_with_optimizer(first_state)
        resumed = resumed.result(WAIT_S)
        assert eval_loss(resumed) == pytest.approx(loss_at_first_save, rel=1e-6)
        train(resumed, range(FIRST_SAVE, SECOND_SAVE))
        second_state = resumed.save_state(f"step-{SECOND_SAVE}").result(WAIT_S).path
        backlog = _submit_backlog(resumed, sampler, SECOND_SAVE)

        servers.append(_restart(servers[1], tmp_path, tiny_model_dir, signal.SIGKILL))

        _check_settled(backlog, samples_survive=False)
        rest = tinker.RestClient(base_url=servers[2].url, api_key=API_KEY)
        _check_stored(rest, training.model_id, {"purpose": "restart"}, {first_state, sampler_path})
        _check_stored(rest, resumed.model_id, {}, {second_state})

        # -- third server: resume again and finish; the result equals a run that was never interrupted
        service = clients.service(servers[2].url)
        final = service.create_training_client_from_state_with_optimizer(second_state).result(WAIT_S)
        train(final, range(SECOND_SAVE, STEPS))
        uninterrupted = service.create_lora_training_client(base_model=servers[2].model, rank=4, seed=SEED)
        uninterrupted = uninterrupted.result(WAIT_S)
        untrained = eval_loss(uninterrupted)
        train(uninterrupted, range(STEPS))
        expected = eval_loss(uninterrupted)
        assert expected < 0.9 * untrained  # training moved the adapter: the comparison below means something
        assert eval_loss(final) == pytest.approx(expected, rel=1e-5)
        # the sampler checkpoint saved before both restarts still samples
        params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=1, stop=[])
        sample = sampler.sample(batch(0)[0].model_input, num_samples=1, sampling_params=params).result(WAIT_S)
        assert len(sample.sequences[0].tokens) == 4

        # what the servers wrote, `tinkerd runs|checkpoints` read from the data dir while the server runs
        data_dir = str(tmp_path / "data")
        listing = json.loads(_cli("runs", "list", "--data-dir", data_dir, "--json"))
        counts = {run["id"]: run["checkpoint_count"] for run in listing["runs"]}
        assert counts == {training.model_id: 2, resumed.model_id: 1, final.model_id: 0, uninterrupted.model_id: 0}
        listing = json.loads(_cli("checkpoints", "list", "--data-dir", data_dir, "--json"))
        assert {c["tinker_path"] for c in listing["checkpoints"]} == {first_state, sampler_path, second_state}
        _cli("checkpoints", "export", second_state, "--out", str(tmp_path / "peft"), "--data-dir", data_dir)
        assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    finally:
        clients.close()
        for server in servers:
            if server.process.poll() is None:
                stop_server(server.process)
