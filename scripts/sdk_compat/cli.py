"""The command line: a live tinkerd (a tiny random Llama by default), every probe, the table."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tinker

from scripts.sdk_compat.harness import SMOLLM2_VOCAB, Env, base_name, inventory
from scripts.sdk_compat.report import markdown, run_all


def tiny_model_dir(root: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and vocabulary (the tokenizer from the tinkerd cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.engine.tiny_models import tiny_config
    from tinkerd import hub
    from tinkerd.settings import Settings

    source = hub.model_dir(Settings.load().cache_dir, hub.DEFAULT_MODEL)
    if not (source / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer at {source}: run `tinkerd models pull` once, or pass --model DIR")
    out = root / "tiny-smollm2"
    config = tiny_config("llama", vocab_size=SMOLLM2_VOCAB)
    config.max_position_embeddings = 512
    config.eos_token_id = 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


@contextmanager
def live_server(model: str | None) -> Iterator[tuple[str, str]]:
    """(base URL, served model name) of an in-process tinkerd."""
    import tinkerd

    with tempfile.TemporaryDirectory(prefix="sdk-compat-") as scratch:
        model = model or str(tiny_model_dir(Path(scratch)))
        with tinkerd.running(model=model, data_dir=Path(scratch) / "data") as base_url:
            yield base_url, model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--model", help="a local HF model directory to serve (default: a tiny random Llama)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--only", nargs="*", default=None, help="probe only these Class.method names")
    args = parser.parse_args(argv)
    methods = inventory()
    if args.only:
        methods = [m for m in methods if m in args.only or base_name(m) in args.only]
    with live_server(args.model) as (base_url, model):
        outcomes = run_all(Env(base_url, model), methods)
    table = f"`tinker` {tinker.__version__} against tinkerd:\n\n" + markdown(outcomes)
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
