"""Drives a tinkerd serving a tiny Qwen-VL with the real Baseten Loops SDK: image chunks in forward_backward and in
sample (which the SDK sends as ``model_input_chunks``). Run in the Loops venv (Python 3.12), not in tinkerd's.

Usage: python loops_image_client.py <base_model> <out.json> <picture.png> <expected_tokens> <vision_start,end,image>
Environment: LOOPS_BASE_URL, BASETEN_API_KEY, LOOPS_REQUEST_LOG.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from baseten.loops import ServiceClient
from baseten.loops.models import AdamParams, Datum, EncodedTextChunk, ImageChunk, ModelInput, SamplingParams, TensorData

READY_TIMEOUT = 60.0
CAPTION = [40, 41, 2]


def main() -> None:
    base_model, out_path, picture = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]).read_bytes()
    n = int(sys.argv[4])
    start, end, image_token = (int(t) for t in sys.argv[5].split(","))
    image = ImageChunk(data=picture, format="png", expected_tokens=n)
    prompt = ModelInput(chunks=[EncodedTextChunk(tokens=[1, start]), image, EncodedTextChunk(tokens=[end, 10])])
    full = [1, start, *[image_token] * n, end, 10, *CAPTION]
    targets = [-100] * (len(full) - 1 - len(CAPTION)) + CAPTION  # only the caption is learnt
    datum = Datum(
        model_input=prompt.append(EncodedTextChunk(tokens=CAPTION[:-1])),
        loss_fn_inputs={"target_tokens": TensorData(data=targets, dtype="int64", shape=[len(targets)])},
    )
    out: dict[str, Any] = {"losses": []}
    service = ServiceClient()
    tc = service.create_lora_training_client(base_model=base_model, rank=4, seed=0, ready_timeout=READY_TIMEOUT)
    for _ in range(4):
        out["losses"].append(tc.forward_backward([datum], "cross_entropy").result().loss)
        tc.optim_step(AdamParams(learning_rate=5e-3)).result()  # 3e-2 overshoots on this tiny model
    sampler = tc.save_weights_and_get_sampling_client("captions")
    greedy = SamplingParams(max_tokens=3, temperature=0.0, stop=[])
    answer = sampler.sample(prompt, num_samples=2, sampling_params=greedy, include_prompt_logprobs=True)
    out["samples"] = [list(s.tokens) for s in answer.sequences]
    out["prompt_token_ids"] = answer.prompt_token_ids
    out["prompt_logprobs"] = answer.prompt_logprobs
    try:
        bad = ModelInput(
            chunks=[EncodedTextChunk(tokens=[1, start]), ImageChunk(data=picture, format="png", expected_tokens=n + 1)]
        )
        sampler.sample(bad, num_samples=1, sampling_params=greedy)
        out["refused"] = None
    except Exception as error:  # what the SDK raises for a final 400
        out["refused"] = f"{type(error).__name__}: {error}"
    out_path.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
