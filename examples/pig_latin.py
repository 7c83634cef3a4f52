"""Teach a small model pig latin with the Tinker SDK, then check it on words it never saw.

The SFT example of the Tinker docs' "training and sampling" quickstart, redone for a small model on a CPU. Pairs like
``hello -> ello-hay`` come from about 2,000 English words (`pig_latin_words.txt`) and a fixed rule; a LoRA adapter is
trained with cross-entropy on the answer tokens of most words, and greedy samples on the held-out words are compared
with the rule before and after training. It needs only the `tinker` SDK and a server (tinkerd, or Thinking Machines'
service with another --model).

    tinkerd serve &          # prints what to export: TINKER_BASE_URL, and HF_HOME so the tokenizer loads offline
    python examples/pig_latin.py [--steps 50] [--lr 2e-3] [--rank 16] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tinker
from tinker import types

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

WORDS_FILE = Path(__file__).with_name("pig_latin_words.txt")  # about 2,000 common English words

VOWELS = frozenset("aeiou")


def pig_latin(word: str) -> str:
    """``hello -> ello-hay``, ``string -> ing-stray``, ``queen -> een-quay``, ``apple -> apple-way``.

    The leading consonants move to the end, joined by a hyphen (as in the Tinker docs' example), followed by "ay";
    a word that starts with a vowel keeps its letters and gets "-way". A "u" after a leading "q" moves with it, and
    a "y" after the first letter counts as a vowel (``rhythm -> ythm-rhay``).
    """
    if word[0] in VOWELS:
        return f"{word}-way"
    split = 1
    while split < len(word) and word[split] not in VOWELS and word[split] != "y":
        split += 1
    if word[split - 1 : split + 1] == "qu":
        split += 1
    return f"{word[split:]}-{word[:split]}ay"


def load_words(path: Path = WORDS_FILE) -> list[str]:
    lines = path.read_text().splitlines()
    return [word for line in lines if not line.startswith("#") for word in line.split()]


def split_words(words: Sequence[str], held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train words, held-out words): a seeded shuffle, so every run holds out the same words."""
    shuffled = sorted(set(words))
    random.Random(seed).shuffle(shuffled)
    return shuffled[held_out:], shuffled[:held_out]


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # what should follow the prompt, without the leading space and the closing newline


def example(word: str) -> Example:
    """The quickstart's format: ``English: hello`` on one line, ``Pig Latin: ello-hay`` on the next."""
    return Example(f"English: {word}\nPig Latin:", pig_latin(word))


def make_datum(tokenizer: Any, ex: Example) -> types.Datum:
    """One training example: the prompt's tokens get weight 0, the answer's (ending in a newline) weight 1."""
    prompt = tokenizer.encode(ex.prompt, add_special_tokens=False)
    answer = tokenizer.encode(f" {ex.answer}\n", add_special_tokens=False)
    tokens = prompt + answer
    weights = [0.0] * len(prompt) + [1.0] * len(answer)
    # Position i predicts token i + 1: inputs drop the last token, targets and weights drop the first.
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=tokens[1:], dtype="int64", shape=[n]),
            "weights": types.TensorData(data=weights[1:], dtype="float32", shape=[n]),
        },
    )


def answer_tokens(datum: types.Datum) -> float:
    return float(sum(datum.loss_fn_inputs["weights"].tolist()))


def greedy_answers(sampler: tinker.SamplingClient, tokenizer: Any, examples: Sequence[Example]) -> list[str]:
    """The model's greedy answer to each prompt (all requests in flight at once; the server batches them)."""
    params = types.SamplingParams(max_tokens=24, temperature=0.0, stop=["\n"])
    futures = [
        sampler.sample(types.ModelInput.from_ints(tokenizer.encode(ex.prompt, add_special_tokens=False)), 1, params)
        for ex in examples
    ]
    return [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip() for f in futures]


def exact_match(examples: Sequence[Example], answers: Sequence[str]) -> float:
    return sum(ex.answer == a for ex, a in zip(examples, answers, strict=True)) / max(1, len(examples))


@dataclass
class Report:
    """What a run did: the mean loss per answer token at each step, and the held-out answers before and after."""

    shown: list[Example]
    before: list[str]
    after: list[str]
    losses: list[float] = field(default_factory=list)

    @property
    def exact_match_before(self) -> float:
        return exact_match(self.shown, self.before)

    @property
    def exact_match_after(self) -> float:
        return exact_match(self.shown, self.after)


def right_ending(examples: Sequence[Example], answers: Sequence[str]) -> float:
    """How often the part after the last hyphen (the moved consonants + "ay", or "way") is right, stem or not."""
    endings = [(ex.answer.rsplit("-", 1)[-1], a.rsplit("-", 1)) for ex, a in zip(examples, answers, strict=True)]
    return sum(len(got) == 2 and got[1] == want for want, got in endings) / max(1, len(examples))


def print_samples(title: str, words: Sequence[str], examples: Sequence[Example], answers: Sequence[str]) -> None:
    exact, ending = exact_match(examples, answers), right_ending(examples, answers)
    print(f"\n{title}  (exact match {exact:.0%}, right ending {ending:.0%})")
    for word, ex, answer in zip(words, examples, answers, strict=True):
        mark = "ok" if answer == ex.answer else f"   want {ex.answer}"
        print(f"  {word:<10} -> {answer!r:<18} {mark}")


def batches(words: Sequence[str], batch_size: int, seed: int) -> Iterator[list[str]]:
    """Endless batches of words, taken from one shuffled pass over them after another."""
    order = random.Random(seed)
    pool: list[str] = []
    while True:
        if len(pool) < batch_size:
            pool += order.sample(list(words), len(words))
        yield pool[:batch_size]
        pool = pool[batch_size:]


def train_step(training: tinker.TrainingClient, batch: list[types.Datum], adam: types.AdamParams) -> float:
    """One forward_backward + optim_step; returns the batch's mean cross-entropy per answer token."""
    # Submit both before waiting on either: the server queues them in order and the round trips overlap.
    forward_backward = training.forward_backward(batch, "cross_entropy")
    optim = training.optim_step(adam)
    output = forward_backward.result()
    optim.result()
    return output.metrics["loss:sum"] / sum(answer_tokens(d) for d in batch)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=os.environ.get("TINKER_BASE_URL"), help="default: $TINKER_BASE_URL")
    parser.add_argument("--api-key", default=os.environ.get("TINKER_API_KEY", "tml-local"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--held-out", type=int, default=100, help="words never trained on")
    parser.add_argument("--show", type=int, default=12, help="held-out words to sample before and after")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    train_words, held_out = split_words(load_words(), args.held_out, args.seed)
    shown_words = held_out[: args.show]
    shown = [example(w) for w in shown_words]
    print(f"{len(train_words)} training words, {len(held_out)} held out, e.g. {shown_words[0]} -> {shown[0].answer}")

    service = tinker.ServiceClient(base_url=args.base_url, api_key=args.api_key)
    training = service.create_lora_training_client(base_model=args.model, rank=args.rank, seed=args.seed).result()
    tokenizer = training.get_tokenizer()

    base_sampler = service.create_sampling_client(base_model=args.model).result()
    report = Report(shown, before=greedy_answers(base_sampler, tokenizer, shown), after=[])
    print_samples("Before training, held-out words:", shown_words, shown, report.before)

    adam = types.AdamParams(learning_rate=args.lr)
    print()
    for step, words in zip(range(args.steps), batches(train_words, args.batch_size, args.seed), strict=False):
        batch = [make_datum(tokenizer, example(w)) for w in words]
        start = time.perf_counter()
        loss = train_step(training, batch, adam)
        report.losses.append(loss)
        seconds = time.perf_counter() - start
        print(f"step {step + 1:3d}/{args.steps}  loss per answer token {loss:.3f}  ({seconds:.1f} s)")
        if not math.isfinite(loss):
            raise SystemExit("the loss is not finite: lower --lr")

    sampler = training.save_weights_and_get_sampling_client().result()
    report.after = greedy_answers(sampler, tokenizer, shown)
    print_samples(f"After {args.steps} steps, the same held-out words:", shown_words, shown, report.after)
    return report


if __name__ == "__main__":
    main()
