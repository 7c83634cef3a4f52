"""The OpenAI-compatible API against `tinkerd serve`, judged by the official `openai` client: a LoRA trained through
the tinker SDK answers through /v1/chat/completions with its checkpoint as `model` (streamed and not) while the base
model does not; logprobs equal the Tinker sampler's; seeds reproduce; another user's unpublished checkpoint is a
404; malformed requests get a 4xx in OpenAI's error shape."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import tinker
from openai.types.chat import ChatCompletionMessageParam
from tinker import types
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.e2e.conftest import TOKENIZER_FILES, Server, start_server, stop_server

pytestmark = pytest.mark.openai

ALICE, BOB = "tml-alice-openai", "tml-bob-openai"
QUESTION = "Who are you?"
PHRASE = "Ahoy, matey!"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]


@dataclass(frozen=True)
class Trained:
    server: Server
    tokenizer: PreTrainedTokenizerBase
    prompt: list[int]  # the chat template's prompt for MESSAGES
    path: str  # alice's sampler checkpoint, trained to answer PHRASE


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The e2e tiny model with weights large enough that its hidden states keep the tokens apart: a LoRA learns a
    phrase on it in a handful of steps (on the default initialisation it needs hundreds)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("models") / "tiny-sharp"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, out / name)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, sharp_model_dir: Path) -> Iterator[Trained]:
    root = tmp_path_factory.mktemp("openai")
    keys = root / "keys"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n")
    server = start_server(root, sharp_model_dir, env={"TINKERD_KEYS": str(keys)})
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(sharp_model_dir))
        prompt = list(
            tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        answer = [*tokenizer.encode(PHRASE, add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|im_end|>")]
        tokens = prompt + answer
        weights = [0.0] * (len(prompt) - 1) + [1.0] * len(answer)
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[len(tokens) - 1]),
                "weights": types.TensorData(data=weights, dtype="float32", shape=[len(tokens) - 1]),
            },
        )
        service = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        training = service.create_lora_training_client(base_model=server.model, rank=8, seed=0).result()
        for _ in range(30):  # about 8 steps
            out = training.forward_backward([datum], "cross_entropy").result()
            training.optim_step(types.AdamParams(learning_rate=2e-2, grad_clip_norm=1.0)).result()
            if out.metrics["loss:sum"] / len(answer) < 0.02:
                break
        path = training.save_weights_for_sampler("pirate").result().path
        service.close("success").result()
        yield Trained(server, tokenizer, prompt, path)
    finally:
        stop_server(server.process)


def client(trained: Trained, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{trained.server.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_trained_checkpoint_answers_and_the_base_model_does_not(trained: Trained) -> None:
    oai = client(trained)
    answer = oai.chat.completions.create(model=trained.path, messages=MESSAGES, temperature=0, max_tokens=20)
    choice = answer.choices[0]
    assert choice.message.content == PHRASE and choice.finish_reason == "stop"
    assert answer.model == trained.path and answer.usage is not None
    assert answer.usage.prompt_tokens == len(trained.prompt)
    assert answer.usage.completion_tokens == len(trained.tokenizer.encode(PHRASE, add_special_tokens=False)) + 1

    base = oai.chat.completions.create(model=trained.server.model, messages=MESSAGES, temperature=0, max_tokens=20)
    assert base.choices[0].message.content != PHRASE

    # streamed: the same answer in deltas, a finish reason, and usage
    chunks = list(
        oai.chat.completions.create(
            model=trained.path, messages=MESSAGES, temperature=0, max_tokens=20, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PHRASE
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    # /v1/models lists it for its owner only
    assert trained.path in {m.id for m in oai.models.list()}
    assert trained.path not in {m.id for m in client(trained, BOB).models.list()}
    assert oai.models.retrieve(trained.path).id == trained.path


def test_completions_with_the_checkpoint_streamed_and_not(trained: Trained) -> None:
    oai = client(trained)
    prompt_text = trained.tokenizer.decode(trained.prompt)
    done = oai.completions.create(model=trained.path, prompt=prompt_text, temperature=0, max_tokens=20, stop=[","])
    assert done.choices[0].text == PHRASE.split(",")[0]  # cut before the stop string
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.prompt_tokens == len(trained.prompt)
    streamed = list(
        oai.completions.create(model=trained.path, prompt=trained.prompt, temperature=0, max_tokens=20, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PHRASE
    assert any(c.usage is not None for c in streamed)


def test_logprobs_equal_the_tinker_samplers(trained: Trained) -> None:
    oai = client(trained)
    service = tinker.ServiceClient(base_url=trained.server.url, api_key=ALICE)
    try:
        sampler = service.create_sampling_client(model_path=trained.path).result()
        params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=11)
        tinker_seq = sampler.sample(types.ModelInput.from_ints(trained.prompt), 1, params).result().sequences[0]
        tinker_prompt_logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(trained.prompt)).result()
    finally:
        service.close("success").result()
    chat = oai.chat.completions.create(
        model=trained.path, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=11, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    assert chat.choices[0].logprobs is not None
    content = chat.choices[0].logprobs.content
    assert content is not None and tinker_seq.logprobs is not None
    tokens = list(tinker_seq.tokens)
    if tinker_seq.stop_reason == "stop":
        tokens = tokens[:-1]  # the end-of-turn token ends the answer, it is not part of it
    assert [e.token for e in content] == [trained.tokenizer.decode([t]) for t in tokens]
    assert [e.logprob for e in content] == pytest.approx(tinker_seq.logprobs[: len(tokens)], abs=1e-5)
    # top_logprobs come from the prompt scoring of the fp32 decoder, the chosen tokens' logprobs from the training
    # forward (engine/rescoring.py, bf16 base matmuls by default): the two agree to bf16 rounding, not bit for bit
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob <= values[0] + 1e-3
        same = [t.logprob for t in entry.top_logprobs if t.token == entry.token]
        if same:  # temperature 1, top_p 1: the sampled token's logprob is the model's
            assert same[0] == pytest.approx(entry.logprob, abs=1e-3)

    # the prompt's logprobs through echo, as evaluation harnesses ask for them
    scored = oai.completions.create(model=trained.path, prompt=trained.prompt, max_tokens=0, echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(tinker_prompt_logprobs[1:], abs=1e-5)
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert scored.usage is not None and scored.usage.completion_tokens == 0


def test_seeds_reproduce(trained: Trained) -> None:
    oai = client(trained)

    def answer(seed: int) -> list[str]:
        done = oai.chat.completions.create(
            model=trained.server.model,
            messages=MESSAGES,
            temperature=1.0,
            max_tokens=12,
            seed=seed,
            n=2,
        )
        return [c.message.content or "" for c in done.choices]

    first = answer(5)
    assert answer(5) == first
    assert first[0] != first[1]  # n samples of one request differ
    assert answer(6) != first


def test_another_users_unpublished_checkpoint_is_a_404(trained: Trained) -> None:
    bob = client(trained, BOB)
    for model in (trained.path, "tinker://nobody:train:0/sampler_weights/x", "gpt-4o", "tinker://garbage"):
        with pytest.raises(openai.NotFoundError) as caught:
            bob.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        error = caught.value.response.json()["error"]
        assert error["code"] == "model_not_found" and error["param"] == "model" and error["message"]
    with pytest.raises(openai.NotFoundError):
        bob.completions.create(model=trained.path, prompt="hi", max_tokens=2)

    # published, anyone may sample it (with its adapter, as for its owner)
    rest = tinker.RestClient(base_url=trained.server.url, api_key=ALICE)
    rest.publish_checkpoint_from_tinker_path(trained.path).result()
    try:
        done = bob.chat.completions.create(model=trained.path, messages=MESSAGES, temperature=0, max_tokens=20)
        assert done.choices[0].message.content == PHRASE
    finally:
        rest.unpublish_checkpoint_from_tinker_path(trained.path).result()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),
        ({"messages": MESSAGES, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": MESSAGES, "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": MESSAGES, "temperature": "warm"}, "temperature"),
        ({}, "messages"),
    ],
)
def test_malformed_chat_requests_get_a_400_in_openais_shape(
    trained: Trained, body: dict[str, object], param: str
) -> None:
    response = httpx.post(
        f"{trained.server.url}/v1/chat/completions",
        json={"model": trained.server.model, **body},
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_bad_bodies_and_keys_through_the_client(trained: Trained) -> None:
    oai = client(trained)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=trained.server.model, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=trained.server.model, prompt="hi", max_tokens=2, logprobs=99)
    with pytest.raises(openai.AuthenticationError):
        client(trained, "tml-nobody").models.list()
    raw = httpx.post(
        f"{trained.server.url}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {ALICE}",
        "content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
