"""scripts/sdk_compat.py: its inventory covers the installed SDK, and its verdicts and table say what happened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scripts import sdk_compat
from scripts.sdk_compat import Env, Invoke, Outcome, base_name, inventory, markdown, run_probe


def test_every_public_method_of_the_installed_sdk_has_a_probe() -> None:
    methods = inventory()
    assert len(methods) > 80  # the four client classes of SDK 0.38 have about a hundred
    assert [m for m in methods if base_name(m) not in sdk_compat.PROBES] == []


def test_no_probe_is_left_for_a_method_the_sdk_no_longer_has() -> None:
    bases = {base_name(m) for m in inventory()}
    assert sorted(set(sdk_compat.PROBES) - bases) == []
    assert set(sdk_compat.NOT_APPLICABLE) <= set(sdk_compat.PROBES)


class _NewerClient:
    """Stands in for an SDK class that grew methods since the probes were written."""

    def brand_new(self) -> None: ...

    async def brand_new_async(self) -> None: ...

    @staticmethod
    def static_one() -> None: ...

    @property
    def not_a_method(self) -> int:
        return 1

    def _private(self) -> None: ...


def test_a_method_no_probe_knows_shows_up_as_untested() -> None:
    methods = inventory((_NewerClient,))
    assert methods == ["_NewerClient.brand_new", "_NewerClient.brand_new_async", "_NewerClient.static_one"]
    env = Env("http://127.0.0.1:1", "unused")  # never contacted: an untested method is not called
    outcomes = [run_probe(env, method) for method in methods]
    assert {o.status for o in outcomes} == {"untested"}
    assert "| `_NewerClient.brand_new` | untested | untested |" in markdown(outcomes)


def _register(monkeypatch: pytest.MonkeyPatch, name: str, probe: sdk_compat.Probe, na: str | None = None) -> None:
    monkeypatch.setitem(sdk_compat.PROBES, name, probe)
    if na is not None:
        monkeypatch.setitem(sdk_compat.NOT_APPLICABLE, name, na)


class _Client:
    def good(self) -> int:
        return 2

    async def good_async(self) -> int:
        return 2

    def wrong(self) -> int:
        return 3

    def raises(self) -> int:
        raise RuntimeError("boom")


def _probe_returning_two(_env: Env, invoke: Invoke) -> str:
    got: Any = invoke(_Client())
    sdk_compat.check(got == 2, f"got {got}")
    return "returned 2"


def test_verdicts_from_what_the_call_did(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_Client.good", "_Client.wrong", "_Client.raises"):
        _register(monkeypatch, name, _probe_returning_two)
    _register(monkeypatch, "_Client.hosted_only", _probe_returning_two, na="a hosted feature")
    env = Env("http://127.0.0.1:1", "unused")
    assert run_probe(env, "_Client.good") == Outcome("_Client.good", "works", "returned 2")
    assert run_probe(env, "_Client.good_async") == Outcome("_Client.good_async", "works", "returned 2")
    assert run_probe(env, "_Client.wrong") == Outcome("_Client.wrong", "fails", "wrong result: got 3")
    assert run_probe(env, "_Client.raises") == Outcome("_Client.raises", "fails", "RuntimeError: boom")
    # n/a methods are still called, and the note says what they answered.
    hosted = run_probe(env, "_Client.hosted_only")
    assert hosted.status == "n/a" and hosted.note.startswith("a hosted feature; it answers AttributeError")


def test_the_table_pairs_sync_and_async_and_counts_each() -> None:
    table = markdown(
        [
            Outcome("A.f", "works", "fine"),
            Outcome("A.f_async", "fails", "HTTP 404: no | such"),
            Outcome("A.g", "n/a", "billing"),
            Outcome("A.h_async", "untested", "no probe knows this method yet"),
        ]
    )
    assert "| `A.f` | works | fails | sync: fine; async: HTTP 404: no \\| such |" in table
    assert "| `A.g` | n/a | — | billing |" in table
    assert "| `A.h` | — | untested | no probe knows this method yet |" in table
    assert table.endswith("4 methods (sync and async counted apart): 1 works, 1 fails, 1 n/a, 1 untested.\n")


CORE = [
    "ServiceClient.create_lora_training_client",
    "ServiceClient.create_training_client_from_state_with_optimizer",
    "TrainingClient.forward_backward",
    "TrainingClient.optim_step",
    "TrainingClient.save_state",
    "TrainingClient.load_state",
    "TrainingClient.save_weights_for_sampler",
    "SamplingClient.sample",
    "SamplingClient.compute_logprobs",
    "RestClient.list_checkpoints",
]


@pytest.mark.slow
def test_the_core_rows_work_against_a_live_server(tmp_path: Path) -> None:
    """The script end to end (in-process tinkerd, tiny model): its probes of the core methods find them working."""
    out = tmp_path / "table.md"
    assert sdk_compat.main(["--only", *CORE, "--out", str(out)]) == 0
    table = out.read_text()
    for method in CORE:
        assert f"| `{method}` | works | " in table, table
    assert f"{2 * len(CORE)} methods (sync and async counted apart): {2 * len(CORE)} works" in table
