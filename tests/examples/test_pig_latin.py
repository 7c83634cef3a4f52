"""`examples/pig_latin.py`: its data rule, its training examples, and a whole run of its main() for two steps against
a live `tinkerd serve` (a tiny random model, so this proves the script works, not that it learns: the learning is
measured by `bench/bench_sft_piglatin.py` on the real weights)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from examples import pig_latin
from tests.e2e.conftest import API_KEY, Server

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("hello", "ello-hay"),
        ("string", "ing-stray"),  # the whole leading consonant cluster moves
        ("apple", "apple-way"),  # a leading vowel keeps the word whole
        ("queen", "een-quay"),  # "qu" moves together
        ("square", "are-squay"),
        ("rhythm", "ythm-rhay"),  # "y" after the first letter is a vowel
        ("yellow", "ellow-yay"),  # a leading "y" is a consonant
    ],
)
def test_pig_latin_rule(word: str, expected: str) -> None:
    assert pig_latin.pig_latin(word) == expected


def test_held_out_words_are_fixed_and_never_trained_on() -> None:
    words = pig_latin.load_words()
    assert len(words) == len(set(words)) > 1000 and all(w.isalpha() and w.islower() for w in words)
    train, held_out = pig_latin.split_words(words, 100, seed=0)
    assert len(held_out) == 100 and len(train) == len(words) - 100
    assert not set(train) & set(held_out)
    assert pig_latin.split_words(words, 100, seed=0) == (train, held_out)
    assert pig_latin.split_words(words, 100, seed=1)[1] != held_out


def test_datum_trains_on_the_answer_only(tokenizer_source: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    datum = pig_latin.make_datum(tokenizer, pig_latin.example("hello"))
    inputs = datum.model_input.to_ints()
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    weights = datum.loss_fn_inputs["weights"].tolist()
    assert len(inputs) == len(targets) == len(weights)
    assert inputs[1:] == targets[:-1]  # targets are the inputs shifted by one
    assert tokenizer.decode(inputs) == "English: hello\nPig Latin: ello-hay"
    answer = [t for t, w in zip(targets, weights, strict=True) if w == 1.0]
    assert tokenizer.decode(answer) == " ello-hay\n"
    assert pig_latin.answer_tokens(datum) == len(answer)


def test_batches_cover_every_word_before_repeating() -> None:
    words = [f"w{i}" for i in range(10)]
    stream = pig_latin.batches(words, 4, seed=0)
    first_pass = next(stream) + next(stream)
    assert len(set(first_pass)) == 8 and set(first_pass) <= set(words)


def test_example_runs_end_to_end(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    report = pig_latin.main(
        ["--base-url", server.url, "--api-key", API_KEY, "--model", server.model,
         "--steps", "2", "--batch-size", "4", "--rank", "4", "--show", "3"]
    )  # fmt: skip
    assert len(report.losses) == 2 and all(math.isfinite(x) and x > 0 for x in report.losses)
    assert len(report.shown) == len(report.before) == len(report.after) == 3
    assert all(ex.prompt.startswith("English: ") and ex.answer.endswith("ay") for ex in report.shown)
    assert 0.0 <= report.exact_match_after <= 1.0
    out = capsys.readouterr().out
    assert "Before training, held-out words:" in out
    assert "step   2/2  loss per answer token" in out
    assert "After 2 steps, the same held-out words:" in out
    assert all(ex.answer in out for ex in report.shown)  # as "want ...", or as the answer itself


def test_right_ending_scores_the_moved_consonants_alone() -> None:
    examples = [pig_latin.example(w) for w in ("hello", "apple", "string")]
    assert pig_latin.right_ending(examples, ["ollo-hay", "apple-way", "ing-tray"]) == pytest.approx(2 / 3)
    assert pig_latin.right_ending(examples, ["hello", "appleway", "ing-stray"]) == pytest.approx(1 / 3)
    assert pig_latin.exact_match(examples, ["ello-hay", "apple-way", "ing-tray"]) == pytest.approx(2 / 3)
