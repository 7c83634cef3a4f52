"""Running the probes (each in its own thread, with a timeout) and the Markdown table of their verdicts."""

from __future__ import annotations

import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import tinker

from scripts.sdk_compat.harness import (
    ASYNC_SUFFIX,
    NOT_APPLICABLE,
    PROBE_TIMEOUT_S,
    PROBES,
    Env,
    ProbeFailed,
    Status,
    base_name,
    current_probe,
    invoker,
)


@dataclass(frozen=True)
class Outcome:
    method: str  # "Class.method"
    status: Status
    note: str


_SESSION_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def _one_line(text: str, limit: int = 160) -> str:
    """A table cell: one line, pipes escaped, session ids replaced (so that tables of two runs compare)."""
    text = _SESSION_ID.sub("<session>", " ".join(str(text).split())).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(error: BaseException) -> str:
    if isinstance(error, ProbeFailed):
        return f"wrong result: {error}"
    if isinstance(error, tinker.APIStatusError):
        body = error.body
        message = body.get("error") if isinstance(body, dict) else None
        return f"HTTP {error.status_code}: {message or error.message}"
    return f"{type(error).__name__}: {error}"


def run_probe(env: Env, method: str) -> Outcome:
    base = base_name(method)
    probe_fn = PROBES.get(base)
    if probe_fn is None:
        return Outcome(method, "untested", "no probe knows this method yet")
    result: dict[str, Any] = {}

    def target() -> None:
        current_probe.method = method
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecations of the older spellings are the point of calling them
                result["note"] = probe_fn(env, invoker(method.split(".", 1)[1]))
        except BaseException as error:  # everything a call can raise is a finding, not a crash of the table
            result["error"] = error

    thread = threading.Thread(target=target, name=f"probe {method}", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    na = NOT_APPLICABLE.get(base)
    if thread.is_alive():
        return Outcome(method, "n/a" if na else "fails", f"no answer within {PROBE_TIMEOUT_S:.0f} s")
    if "error" in result:
        detail = _describe(result["error"])
        return Outcome(method, "n/a", f"{na}; it answers {detail}") if na else Outcome(method, "fails", detail)
    return Outcome(method, "n/a", f"{na}; {result['note']}") if na else Outcome(method, "works", result["note"])


def run_all(env: Env, methods: list[str]) -> list[Outcome]:
    outcomes = []
    for method in methods:
        outcome = run_probe(env, method)
        print(f"{outcome.status:9} {method}: {_one_line(outcome.note, 100)}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    return outcomes


def markdown(outcomes: list[Outcome]) -> str:
    """One row per method name, sync and *_async side by side (with one note when both fared alike)."""
    by_method = {o.method: o for o in outcomes}
    rows: dict[str, dict[str, Outcome]] = {}
    for outcome in outcomes:
        cls, name = outcome.method.split(".", 1)
        variant = "async" if name.endswith(ASYNC_SUFFIX) else "sync"
        rows.setdefault(f"{cls}.{base_name(name)}", {})[variant] = outcome
    lines = ["| method | sync | async | notes |", "|---|---|---|---|"]
    for key, variants in rows.items():
        sync, async_ = variants.get("sync"), variants.get("async")
        if sync is not None and async_ is not None and sync.status != async_.status:
            note = f"sync: {sync.note}; async: {async_.note}"
        else:
            note = (sync or async_ or Outcome(key, "untested", "")).note  # the same verdict: the sync one's note
        cells = [variants[v].status if v in variants else "—" for v in ("sync", "async")]
        note = _one_line(note)
        lines.append(f"| `{key}` | {cells[0]} | {cells[1]} | {note} |")
    counts = {s: sum(1 for o in by_method.values() if o.status == s) for s in ("works", "fails", "n/a", "untested")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return "\n".join(lines) + f"\n\n{len(by_method)} methods (sync and async counted apart): {summary}.\n"
