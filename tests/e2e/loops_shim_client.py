"""A short SFT loop through the ``baseten-loops-tinker`` shim's ``tinker.ServiceClient``; run in the shim's venv.

Usage: python loops_shim_client.py <base_model> <out.json>
Environment: LOOPS_BASE_URL, BASETEN_API_KEY, LOOPS_REQUEST_LOG. Writes what the shim returned as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import tinker
from tinker import types

PROMPT = [1, 330, 1345, 314, 260, 2593, 30, 216]


def datum(tokens: list[int]) -> types.Datum:
    targets = [*tokens[1:], 2]
    weights = [0.0] * 3 + [1.0] * (len(targets) - 3)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=targets, dtype="int64", shape=[len(targets)]),
            "weights": types.TensorData(data=weights, dtype="float32", shape=[len(weights)]),
        },
    )


def main() -> None:
    base_model, out_path = sys.argv[1], Path(sys.argv[2])
    out: dict[str, Any] = {"shim_version": tinker.__version__}
    service = tinker.ServiceClient(base_url=os.environ["LOOPS_BASE_URL"], api_key=os.environ["BASETEN_API_KEY"])
    trainer = service.create_lora_training_client(base_model=base_model, rank=4, ready_timeout=60)
    out["run_id"] = trainer.run_id
    batch = [datum(PROMPT), datum(PROMPT[::-1])]
    losses: list[float] = []
    for _ in range(4):
        result = trainer.forward_backward(batch, "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=0.01)).result()
        losses.append(result.loss)
    out["losses"] = losses
    sampler = trainer.save_weights_and_get_sampling_client("sft-final")
    params = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    response = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=2, sampling_params=params)
    out["samples"] = [list(s.tokens) for s in response.sequences]
    files = service.create_rest_client().get_checkpoint_archive_url(trainer.run_id, sampler.checkpoint_name).result()
    out["files"] = sorted(f.relative_file_name for f in files.presigned_urls)
    out_path.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
