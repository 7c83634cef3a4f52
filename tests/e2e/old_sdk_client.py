"""A core Tinker flow written for the SDKs of the 0.2x series, run by an OLDER `tinker` than the one installed here.

tests/e2e/test_old_sdk.py runs this file with the python of a separate venv that holds e.g. tinker 0.25.0, against a
live `tinkerd serve`. It only records what the SDK returned (as JSON, to the file named by the third argument); the
test asserts on it. It imports nothing from tinkerd or the tests: the old SDK's venv has neither.

    python old_sdk_client.py BASE_URL BASE_MODEL OUT_JSON

In these SDKs the synchronous ServiceClient / TrainingClient factories return clients directly (0.38 returns
futures), and forward/forward_backward/optim_step/save_* return futures. `tinker` is imported untyped on purpose: the
type checker only knows the installed (newer) SDK.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from typing import Any

PROMPT = [1, 17, 300, 4000, 42, 7, 99]
API_KEY = "tml-old-sdk"


def _datum(types: Any, tokens: list[int]) -> Any:
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=[1.0] * n, dtype="float32", shape=[n]),
        },
    )


def _forward_record(output: Any) -> dict[str, Any]:
    return {
        "loss_fn_output_type": output.loss_fn_output_type,
        "metrics": dict(output.metrics),
        "logprobs": [list(map(float, o["logprobs"].to_numpy())) for o in output.loss_fn_outputs],
    }


def _sample_record(response: Any) -> dict[str, Any]:
    return {
        "sequences": [
            {"tokens": list(s.tokens), "stop_reason": str(s.stop_reason), "logprobs": s.logprobs}
            for s in response.sequences
        ],
        "prompt_logprobs": response.prompt_logprobs,
    }


def _record_wire(wire: list[dict[str, Any]]) -> None:
    """Note every HTTP exchange the SDK makes (all its transports sit under httpx.AsyncClient.send): which endpoint,
    which body and result encodings, so the test can check that the flow took this SDK version's wire path."""
    import httpx

    original = httpx.AsyncClient.send

    async def send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        response = await original(self, request, **kwargs)
        wire.append(
            {
                "method": request.method,
                "path": request.url.path,
                "content_type": request.headers.get("content-type", ""),
                "accept": request.headers.get("accept", ""),
                "status": response.status_code,
                "response_type": response.headers.get("content-type", ""),
            }
        )
        return response

    httpx.AsyncClient.send = send  # type: ignore[method-assign]


def run(base_url: str, base_model: str) -> dict[str, Any]:
    wire: list[dict[str, Any]] = []
    _record_wire(wire)
    tinker = importlib.import_module("tinker")
    types = tinker.types
    out: dict[str, Any] = {"sdk_version": tinker.__version__}
    datum = _datum(types, PROMPT)
    adam = types.AdamParams(learning_rate=1e-2)

    service = tinker.ServiceClient(base_url=base_url, api_key=API_KEY)
    out["capabilities"] = [m.model_name for m in service.get_server_capabilities().supported_models]

    training = service.create_lora_training_client(base_model=base_model, rank=4, seed=1)
    out["model_id"] = training.model_id
    info = training.get_info()
    out["info"] = {"model_name": info.model_data.model_name, "lora_rank": info.lora_rank}

    out["forward_before"] = _forward_record(training.forward([datum], "cross_entropy").result())
    out["train_losses"] = []
    for _ in range(4):
        # Submitted back to back, as the SDK recommends: the server keeps them in seq_id order.
        fwd_bwd = training.forward_backward([datum], "cross_entropy")
        step = training.optim_step(adam)
        out["train_losses"].append(fwd_bwd.result().metrics["loss:sum"])
        out.setdefault("optim_metrics", step.result().metrics)
    out["forward_after"] = _forward_record(training.forward([datum], "cross_entropy").result())

    saved = training.save_state("old-sdk-state").result()
    out["state_path"] = saved.path
    restored = service.create_training_client_from_state(saved.path)
    out["restored_model_id"] = restored.model_id
    out["restored_forward"] = _forward_record(restored.forward([datum], "cross_entropy").result())
    # One more step moves the original away from the saved state; load_state brings it back.
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(adam).result()
    out["moved_forward"] = _forward_record(training.forward([datum], "cross_entropy").result())
    training.load_state(saved.path).result()
    out["reloaded_forward"] = _forward_record(training.forward([datum], "cross_entropy").result())
    with_optimizer = service.create_training_client_from_state_with_optimizer(saved.path)
    out["with_optimizer_forward"] = _forward_record(with_optimizer.forward([datum], "cross_entropy").result())

    sampler_path = training.save_weights_for_sampler("old-sdk-sampler").result().path
    out["sampler_path"] = sampler_path
    sampler = service.create_sampling_client(model_path=sampler_path)
    prompt = types.ModelInput.from_ints(PROMPT)
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    out["greedy"] = _sample_record(sampler.sample(prompt, num_samples=2, sampling_params=greedy).result())
    with_prompt = sampler.sample(prompt, num_samples=1, sampling_params=greedy, include_prompt_logprobs=True)
    out["greedy_with_prompt_logprobs"] = _sample_record(with_prompt.result())
    out["compute_logprobs"] = sampler.compute_logprobs(prompt).result()

    snapshot = training.save_weights_and_get_sampling_client()
    out["snapshot_greedy"] = _sample_record(snapshot.sample(prompt, num_samples=1, sampling_params=greedy).result())

    async def async_calls() -> dict[str, Any]:
        fwd = await training.forward_async([datum], "cross_entropy")
        sampled = await sampler.sample_async(prompt, num_samples=1, sampling_params=greedy)
        return {"forward": _forward_record(await fwd.result_async()), "sample": _sample_record(sampled)}

    out["async"] = asyncio.run(async_calls())
    out["wire"] = wire
    return out


if __name__ == "__main__":
    url, model, path = sys.argv[1:4]
    with open(path, "w") as sink:
        json.dump(run(url, model), sink)
