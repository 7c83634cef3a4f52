"""Which methods of the installed `tinker` SDK work against tinkerd: tries each one on a live server, prints Markdown.

    .venv/bin/python -m scripts.sdk_compat [--model DIR] [--out FILE] [--only Class.method ...]

The inventory is read from the installed SDK (every public method of ServiceClient, TrainingClient, SamplingClient
and RestClient, the sync and the *_async variant each), so a method a new SDK adds shows up as "untested" until a
probe for it is written here. Each probe calls the method through the SDK with sensible arguments against a
`tinkerd.running()` server and checks what came back (a result that is merely "no exception" is not enough):

- works: the call returned and its result checked out;
- fails: the call raised, or its result was wrong (the error is in the note);
- n/a: the method is about something tinkerd has no equivalent of (billing, a web console, JWT identities);
  it is still called, and the note says what it answered;
- untested: no probe knows how to call it.

By default the server serves a tiny random Llama with SmolLM2's tokenizer (taken from the tinkerd cache: run
`tinkerd models pull` once), so the whole table takes under a minute on a CPU.

Layout: ``harness`` (the inventory, invoking a method, the shared clients and checks, the probe registry), one
module of probes per client class (``probes_service``, ``probes_training``, ``probes_sampling``, ``probes_rest``),
``report`` (running the probes, the table) and ``__main__`` (the server and the command line).
"""

from scripts.sdk_compat import probes_rest, probes_sampling, probes_service, probes_training
from scripts.sdk_compat.cli import live_server, main, tiny_model_dir
from scripts.sdk_compat.harness import (
    CLASSES,
    NOT_APPLICABLE,
    PROBES,
    Env,
    Invoke,
    Probe,
    ProbeFailed,
    base_name,
    check,
    inventory,
    probe,
    public_methods,
)
from scripts.sdk_compat.report import Outcome, markdown, run_all, run_probe

__all__ = [
    "CLASSES",
    "NOT_APPLICABLE",
    "PROBES",
    "Env",
    "Invoke",
    "Outcome",
    "Probe",
    "ProbeFailed",
    "base_name",
    "check",
    "inventory",
    "live_server",
    "main",
    "markdown",
    "probe",
    "probes_rest",
    "probes_sampling",
    "probes_service",
    "probes_training",
    "public_methods",
    "run_all",
    "run_probe",
    "tiny_model_dir",
]
