"""The vLLM backend without vLLM: requests as completions bodies, answers back as results, refusals, start failures.

The answers are shaped as vLLM 0.32's ``/v1/completions`` returns them (``CompletionResponse`` with
``return_token_ids`` and ``return_tokens_as_token_ids``); the real engine is tested in ``tests/vllm``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tinkerd.domain.errors import InvalidRequestError, SettingsError
from tinkerd.domain.ops import CellGrid, SamplingParams
from tinkerd.engine.lora import LoraWeights
from tinkerd.engine.sample_job import SampleJob
from tinkerd.engine.vllm import VllmConfig, VllmEngine, VllmStartError, adapters, installed_python
from tinkerd.engine.vllm.completions import parse_response, refuse_unsupported, request_body
from tinkerd.engine.vllm.http import EngineRefused

PROMPT = [5, 6, 7, 8]


def weights(rank: int = 8, modules: tuple[str, ...] = ("model.layers.0.self_attn.q_proj",)) -> LoraWeights:
    return LoraWeights(
        rank, 8.0, {m: torch.zeros(rank, 4) for m in modules}, {m: torch.zeros(4, rank) for m in modules}
    )


def test_a_request_becomes_a_completions_body_of_token_ids() -> None:
    params = SamplingParams(
        max_tokens=9, temperature=0.7, top_p=0.9, top_k=-1, seed=3, stop_strings=("\n",), stop_token_ids=(2,)
    )
    body = request_body(SampleJob(PROMPT, params, 4, None, prompt_logprobs=True, topk_prompt_logprobs=2), "tinkerd-v3")
    assert body["model"] == "tinkerd-v3" and body["prompt"] == PROMPT and body["n"] == 4
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"], body["seed"]) == (9, 0.7, 0.9, -1, 3)
    assert body["stop"] == ["\n"] and body["stop_token_ids"] == [2] and body["include_stop_str_in_output"]
    assert body["ignore_eos"] and body["return_token_ids"] and body["return_tokens_as_token_ids"]
    assert body["prompt_logprobs"] == 2 and body["logprobs"] == 0
    assert "seed" not in request_body(SampleJob(PROMPT, SamplingParams(), 1, None), "base")
    assert "prompt_logprobs" not in request_body(SampleJob(PROMPT, SamplingParams(), 1, None), "base")


def _prompt_row(actual: int, rank: int, others: dict[int, float]) -> dict[str, dict[str, object]]:
    row = {str(t): {"logprob": lp, "rank": i + 1, "decoded_token": "x"} for i, (t, lp) in enumerate(others.items())}
    row.setdefault(str(actual), {"logprob": -9.0, "rank": rank, "decoded_token": "y"})
    return row


def test_an_answer_becomes_a_result_with_prompt_and_top_k_logprobs() -> None:
    job = SampleJob(PROMPT, SamplingParams(max_tokens=2), 2, None, prompt_logprobs=True, topk_prompt_logprobs=2,
                    topk_sample_logprobs=2)  # fmt: skip
    rows = [
        None,
        _prompt_row(6, 1, {6: -0.5, 9: -1.5}),
        _prompt_row(7, 7, {1: -0.2, 3: -2.0}),
        _prompt_row(8, 2, {4: -0.1, 8: -3.0}),
    ]
    choice = {
        "token_ids": [11, 12],
        "logprobs": {
            "token_logprobs": [-0.25, -0.75],
            "tokens": ["token_id:11", "token_id:12"],
            "top_logprobs": [{"token_id:11": -0.25, "token_id:40": -2.0}, {"token_id:13": -0.5, "token_id:12": -0.75}],
        },
        "prompt_logprobs": rows,
    }
    answer = {
        "choices": [{**choice, "index": 1, "finish_reason": "stop"}, {**choice, "index": 0, "finish_reason": "length"}]
    }
    result = parse_response(job, answer)
    assert [s.stop_reason for s in result.sequences] == ["length", "stop"]  # in index order
    assert result.sequences[0].tokens == [11, 12] and result.sequences[0].logprobs == [-0.25, -0.75]
    assert result.sequences[0].topk_logprobs == [[(11, -0.25), (40, -2.0)], [(13, -0.5), (12, -0.75)]]
    assert result.prompt_logprobs == [None, -0.5, -9.0, -3.0]  # the prompt's own token, even outside the top k
    assert result.topk_prompt_logprobs == [None, [(6, -0.5), (9, -1.5)], [(1, -0.2), (3, -2.0)], [(4, -0.1), (8, -3.0)]]

    last = SampleJob(PROMPT, SamplingParams(max_tokens=2), 2, None, prompt_logprobs=True, prompt_logprobs_last_n=1)
    assert parse_response(last, answer).prompt_logprobs == [None, None, None, -3.0]
    with pytest.raises(RuntimeError, match="1 of 3 samples"):
        parse_response(SampleJob(PROMPT, SamplingParams(), 3, None), {"choices": [answer["choices"][0]]})


@pytest.mark.parametrize(
    ("job", "named"),
    [
        (
            SampleJob(PROMPT, SamplingParams(), 1, None, target_prompt_logprobs=CellGrid((3, 1), [0], [0], [1])),
            "target_prompt_logprobs",
        ),
        (SampleJob(PROMPT, SamplingParams(), 1, None, prompt_alt_tokens_k=2), "prompt_alt_tokens_k"),
        (SampleJob(PROMPT, SamplingParams(logprobs_of="sampled"), 1, None), "sampled logprobs"),
        (SampleJob(PROMPT, SamplingParams(temperature=0.5), 1, None, topk_sample_logprobs=3), "topk_sample_logprobs"),
        (
            SampleJob(PROMPT, SamplingParams(), 1, None, topk_prompt_logprobs=65),
            "topk_prompt_logprobs must be at most 64",
        ),
        (SampleJob(PROMPT, SamplingParams(), 1, weights(rank=128)), "LoRA rank 128"),
        (SampleJob(PROMPT, SamplingParams(), 1, weights(modules=("embed_out",))), "train_unembed"),
    ],
)
def test_what_vllm_cannot_express_is_refused_by_name(job: SampleJob, named: str) -> None:
    with pytest.raises(InvalidRequestError, match=named):
        refuse_unsupported(job, max_logprobs=64, max_lora_rank=64, rescored=True)


def test_an_adapter_of_lm_head_is_passed_to_vllm() -> None:
    """vLLM adapts lm_head itself (train_unembed=True, the SDK's default); tests/vllm checks the numbers."""
    adapted = weights(modules=("model.layers.0.self_attn.q_proj", "lm_head"))
    job = SampleJob(PROMPT, SamplingParams(), 1, adapted)
    refuse_unsupported(job, max_logprobs=64, max_lora_rank=64, rescored=True)


def test_an_adapter_vllm_has_no_wrapper_for_is_a_400_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM 0.32's refusal of an lm_head adapter on a model whose implementation has no lm_head LoRA (Qwen2), as its
    load_lora_adapter answered in a probe: a 500 while the engine stays up. tinkerd says what to do instead."""
    said = (
        "Call to add_lora method failed: Worker failed with error 'While loading <path>, expected target modules in "
        "{'o_proj', 'q_proj'} but received ['lm_head', 'lm_head']. Please verify that the loaded LoRA module is "
        "correct', please check the stack trace above for the root cause"
    )

    def refuse(*args: object, **kwargs: object) -> None:
        raise EngineRefused(500, said)

    monkeypatch.setattr(adapters, "call", refuse)
    registry = adapters.AdapterRegistry(tmp_path, "base", 2, lambda: "http://127.0.0.1:1")
    version = registry.acquire(weights(modules=("model.layers.0.self_attn.q_proj", "lm_head")))
    with pytest.raises(InvalidRequestError, match=r"no LoRA for lm_head .*train_unembed=False") as caught:
        registry.ensure_loaded(version, "http://127.0.0.1:1", 1)
    assert "expected target modules" in str(caught.value) and "stack trace" not in str(caught.value)
    assert version.loaded_in == 0


def test_what_it_can_express_passes() -> None:
    for job in (
        SampleJob(PROMPT, SamplingParams(temperature=0.5, top_k=5, top_p=0.5, seed=1), 3, weights()),
        SampleJob(PROMPT, SamplingParams(temperature=1.0), 1, None, topk_sample_logprobs=3, prompt_logprobs=True),
        SampleJob(PROMPT, SamplingParams(temperature=0.5, logprobs_of="model"), 1, None, topk_sample_logprobs=3),
    ):
        refuse_unsupported(job, max_logprobs=64, max_lora_rank=64, rescored=True)
    unscored = SampleJob(PROMPT, SamplingParams(temperature=0.5), 1, None)
    with pytest.raises(InvalidRequestError, match=r"tempered logprobs at temperature 0\.5"):
        refuse_unsupported(unscored, max_logprobs=64, max_lora_rank=64, rescored=False)


def test_no_vllm_environment_is_a_settings_error_saying_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="make vllm"):
        installed_python(tmp_path)


def test_a_python_without_vllm_fails_the_start_at_once_with_its_reason(tmp_path: Path) -> None:
    """tinkerd's own python has no vllm: the server exits at once, and the error carries the end of its log."""
    engine = VllmEngine(VllmConfig(python=Path(sys.executable), model_dir=tmp_path, work_dir=tmp_path / "work"))
    with pytest.raises(VllmStartError, match="No module named 'vllm'"):
        engine.start()
    assert engine.pid is None
