"""The api's own tokenizer and chat-template rendering (no transformers in the api) against Hugging Face's
``apply_chat_template`` and tokenizer, on SmolLM2's real tokenizer files."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tinkerd.api.openai.text import TemplateError, TextCodec
from tinkerd.domain.errors import InvalidRequestError

pytestmark = pytest.mark.openai

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Héllo, 世界"},
        {"role": "assistant", "content": "Hi!\nHow can I help?"},
        {"role": "user", "content": "  spaces  "},
    ],
]


@pytest.fixture(scope="module")
def ours(tiny_model_dir: Path) -> TextCodec:
    return TextCodec(tiny_model_dir)


@pytest.fixture(scope="module")
def theirs(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompts_match_apply_chat_template(
    ours: TextCodec, theirs: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    expected = theirs.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ours.encode(text, add_special_tokens=False) == list(expected)


def test_plain_text_and_decoding_match_the_hf_tokenizer(ours: TextCodec, theirs: PreTrainedTokenizerBase) -> None:
    for text in ("The quick brown fox", "  leading spaces, ünïcödé and 数字 123", "<|im_start|>user"):
        tokens = ours.encode(text, add_special_tokens=True)
        assert tokens == theirs(text).input_ids
        assert ours.decode(tokens) == theirs.decode(tokens, skip_special_tokens=True)
    assert ours.token_text(2) == "<|im_end|>" and 2 in ours.special_ids()


def test_a_model_without_a_template_or_a_failing_template_is_a_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    bare = TextCodec(tmp_path)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        bare.render_chat([{"role": "user", "content": "hi"}])
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        TextCodec(tmp_path).render_chat([{"role": "user", "content": "hi"}])
