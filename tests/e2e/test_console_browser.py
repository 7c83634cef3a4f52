"""The web console in a real browser (Debian's headless chromium through Playwright) against `tinkerd serve` with
two users: sign in, watch a run the SDK is training add points to its curves, publish a checkpoint, sample in the
playground, never see the other user's runs, and see HTML in metadata shown as text. Screenshots of every page go
to build/console-screenshots/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
import tinker
from playwright.sync_api import BrowserContext, Dialog, Page, expect
from tinker import types

from tests.e2e.browser import SCREENSHOTS, browser_context
from tests.e2e.conftest import Server, start_server, stop_server
from tests.e2e.test_sdk_training import PROMPT, datum

pytestmark = pytest.mark.browser
T = TypeVar("T")

ALICE, BOB = "tml-console-alice", "tml-console-bob"
XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


@pytest.fixture(scope="module")
def two_user_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("console")
    keys = root / "keys.txt"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n")
    running = start_server(root, tiny_model_dir, args=["--keys", str(keys)])
    try:
        yield running
    finally:
        stop_server(running.process)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with browser_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _sign_in(page: Page, url: str, key: str) -> None:
    page.goto(f"{url}/console/")
    page.fill("#api-key", key)
    page.click("#signin button[type=submit]")
    expect(page.locator("#runs")).to_be_visible()


def _sdk(work: Callable[[], T]) -> T:
    """Run SDK calls off the test's thread: Playwright's sync API keeps an event loop there, and the SDK's blocking
    ``result()`` warns (with a stack) when it finds one."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result()


def _train_step(training: tinker.TrainingClient, learning_rate: float) -> None:
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=learning_rate)).result()


def _drift_step(training: tinker.TrainingClient, sampler_path: str) -> None:
    """An importance-sampling step on tokens a sampler drew with their sampler logprobs, so the step records how
    far the trainer's logprobs are from the sampler's (the sampler/trainer agreement curve)."""
    sampler = training.create_sampling_client(sampler_path).result()
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3, stop=[])
    sequence = sampler.sample(types.ModelInput.from_ints(PROMPT), 1, params).result().sequences[0]
    assert sequence.logprobs is not None
    tokens = PROMPT + sequence.tokens
    sampled = [0.0] * (len(PROMPT) - 1) + list(sequence.logprobs)
    advantages = [0.0] * (len(PROMPT) - 1) + [1.0] * len(sequence.tokens)
    inputs = {
        "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
        "logprobs": types.TensorData.from_numpy(np.asarray(sampled, dtype=np.float32)),
        "advantages": types.TensorData.from_numpy(np.asarray(advantages, dtype=np.float32)),
    }
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
    training.forward_backward([datum], "importance_sampling").result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()


def _copied(page: Page) -> str:
    """The command a copy button put on the clipboard, as its toast shows it (headless chromium may refuse the
    clipboard, and then the toast offers the text to copy by hand)."""
    toast = page.locator("#toast")
    expect(toast).to_contain_text(re.compile("^Cop(ied|y this): "))
    text = toast.text_content() or ""
    page.evaluate("document.getElementById('toast').textContent = ''")
    for prefix in ("Copied: ", "Copy this: "):
        if text.startswith(prefix):
            return text.removeprefix(prefix)
    raise AssertionError(f"unexpected toast: {text!r}")


def _shell(command: str, cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(command, shell=True, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, (command, done.stdout, done.stderr)


def _downloaded(command: str, server: Server, tmp_path: Path) -> None:
    assert command.startswith("curl ") and "/archive" in command, command
    _shell(command, tmp_path, {"TINKER_API_KEY": ALICE})
    with tarfile.open(tmp_path / "console-ckpt.tar") as archive:
        assert any(name.endswith("adapter_model.safetensors") for name in archive.getnames()), archive.getnames()


def _exported(command: str, server: Server, tmp_path: Path) -> None:
    assert command.startswith("tinkerd checkpoints export ") and "--owner alice" in command, command
    bin_dir = str(Path(sys.executable).parent)
    data_dir = str(server.log.parent / "data")
    _shell(command, tmp_path, {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TINKERD_DATA_DIR": data_dir})
    assert (tmp_path / "console-ckpt" / "adapter_config.json").is_file()


def test_console_in_a_real_browser(two_user_server: Server, browser: BrowserContext, tmp_path: Path) -> None:
    server = two_user_server
    alice = tinker.ServiceClient(base_url=server.url, api_key=ALICE, user_metadata={"team": XSS})
    bob = tinker.ServiceClient(base_url=server.url, api_key=BOB)

    def setup() -> tuple[str, tinker.TrainingClient]:
        bob_run = bob.create_lora_training_client(base_model=server.model, rank=2).result()
        training = alice.create_lora_training_client(
            base_model=server.model, rank=4, seed=0, user_metadata={"name": XSS, "purpose": "console test"}
        ).result()
        _train_step(training, 1e-2)
        return bob_run.model_id, training

    try:
        bob_run_id, training = _sdk(setup)
        _browse(server, browser, training, bob_run_id, tmp_path)
    finally:
        _sdk(lambda: (alice.close("success").result(), bob.close("success").result()))


def _browse(
    server: Server,
    browser: BrowserContext,
    training: tinker.TrainingClient,
    bob_run_id: str,
    tmp_path: Path,
) -> None:
    page = browser.new_page()
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:  # an alert() from injected script would land here
        if dialog.type == "confirm" and dialog.message.startswith("Delete tinker://"):
            dialog.accept()  # the page's own question before deleting a checkpoint
            return
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)

    # The page is served with a Content-Security-Policy; a wrong key is refused, a right one signs in.
    response = page.goto(f"{server.url}/console/")
    assert response is not None
    assert "script-src 'self'" in (response.headers.get("content-security-policy") or "")
    page.fill("#api-key", "tml-wrong")
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("not known")
    _shot(page, "0-sign-in")
    _sign_in(page, server.url, ALICE)
    assert page.evaluate("sessionStorage.getItem('tinkerd.apiKey')") == ALICE
    assert browser.cookies() == []

    # Runs: Alice's run, newest first, with its metadata as text; never Bob's.
    rows = page.locator("#runs tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(training.model_id)
    expect(rows.first.locator("td.meta")).to_contain_text("<script>window.__pwned=2</script>")
    assert bob_run_id not in page.content()
    page.fill("#run-filter", "no such run")
    expect(rows).to_have_count(0)
    page.fill("#run-filter", "console test")
    expect(rows).to_have_count(1)
    _shot(page, "1-runs")

    # The run page: its curves grow while the SDK trains.
    rows.first.locator("a").click()
    expect(page.locator("#run-title")).to_have_text(training.model_id)
    loss_chart = page.locator('.chart[data-metric="Loss per token"]')
    expect(loss_chart).to_have_attribute("data-points", "1")
    expect(page.locator('.chart[data-metric="Learning rate"]')).to_be_visible()
    expect(page.locator("pre")).to_contain_text('"name": "<img src=x onerror=')

    # Each step the SDK trains shows up on the open page without a reload.
    for step in range(1, 5):
        _sdk(lambda lr=1e-2 / (step + 1): _train_step(training, lr))
        expect(loss_chart).to_have_attribute("data-points", str(step + 1), timeout=30_000)
    expect(page.locator('.chart[data-metric="Gradient norm"]')).to_have_attribute("data-points", "5")
    _shot(page, "2-run")

    # Checkpoints: save one for the sampler, publish it from the page.
    path = _sdk(lambda: training.save_weights_for_sampler("console-ckpt").result().path)
    page.reload()
    checkpoint = page.locator(f'tr.checkpoint[data-path="{path}"]')
    expect(checkpoint.locator(".published")).to_have_text("private")
    checkpoint.locator("button.publish").click()
    expect(checkpoint.locator(".published")).to_have_text("published")
    rest = tinker.RestClient(base_url=server.url, api_key=ALICE)
    listed = _sdk(lambda: rest.list_checkpoints(training.model_id).result().checkpoints)
    assert [c.public for c in listed if c.tinker_path == path] == [True]
    checkpoint.locator("input.ttl").fill("3600")
    checkpoint.locator("button.set-ttl").click()
    expect(checkpoint.locator(".expires")).not_to_have_text("never")
    # The copied commands work as they are: the download from anywhere with the key, the export on the server.
    for button, check in (("copy-download", _downloaded), ("copy-export", _exported)):
        checkpoint.locator(f"button.{button}").click()
        check(_copied(page), server, tmp_path)
    # A step scored against the sampler's logprobs adds the sampler/trainer agreement curve, live.
    _sdk(lambda: _drift_step(training, path))
    agreement = page.locator('.chart[data-metric="Sampler vs trainer: mean |Δ logprob|"]')
    expect(agreement).to_have_attribute("data-points", "1", timeout=30_000)
    private = _sdk(lambda: training.save_weights_for_sampler("console-private").result().path)
    page.reload()
    expect(page.locator("tr.checkpoint")).to_have_count(2)
    expect(agreement).to_have_attribute("data-points", "1")
    _shot(page, "3-run-checkpoints")
    # A training checkpoint: published and unpublished again, its download command the SDK's CLI, then deleted.
    state = _sdk(lambda: training.save_state("console-state").result().path)
    page.reload()
    row = page.locator(f'tr.checkpoint[data-path="{state}"]')
    row.locator("button.publish").click()
    expect(row.locator(".published")).to_have_text("published")
    row.locator("button.unpublish").click()
    expect(row.locator(".published")).to_have_text("private")
    row.locator("button.copy-download").click()
    assert _copied(page) == f"tinker checkpoint download {state}"
    row.locator("button.delete").click()
    expect(row).to_have_count(0)
    expect(page.locator("tr.checkpoint")).to_have_count(2)
    remaining = _sdk(lambda: rest.list_checkpoints(training.model_id).result().checkpoints)
    assert sorted(c.tinker_path for c in remaining) == sorted([path, private])

    # The playground samples the published checkpoint through the Tinker API, tokens shaded by logprob.
    page.click('nav a[data-page="playground"]')
    page.select_option("#pg-model", label=f"checkpoint {path}")
    page.fill("#pg-prompt", "The quick brown fox")
    page.fill("#pg-max_tokens", "12")
    page.fill("#pg-seed", "7")
    page.click("#pg-sample")
    page.wait_for_selector("#pg-output .sample-card, #pg-output .error", timeout=60_000)
    assert page.locator("#pg-output .error").count() == 0, page.locator("#pg-output").inner_text()
    tokens = page.locator(".sample-card .tok")
    expect(tokens).to_have_count(12)
    logprobs = [float(v) for v in tokens.evaluate_all("els => els.map(e => e.dataset.logprob)")]
    assert all(lp <= 0 for lp in logprobs)
    expect(page.locator(".sample-card .prompt")).to_have_text("The quick brown fox")
    _shot(page, "4-playground")
    page.select_option("#pg-mode", "chat")
    page.fill("#pg-messages .message textarea", "Say hi")
    page.select_option("#pg-model", index=0)  # the base model
    page.click("#pg-sample")
    expect(page.locator(".sample-card .prompt")).to_contain_text("<|im_start|>user\nSay hi", timeout=60_000)

    # Sessions and the server page.
    page.click('nav a[data-page="sessions"]')
    sessions = page.locator("#sessions tbody tr")
    expect(sessions).to_have_count(2)  # the SDK's, and the playground's (its samplers: the checkpoint, the base)
    expect(sessions.nth(0)).to_contain_text(f":sample:1 {server.model}")
    expect(sessions.nth(0)).to_contain_text(f":sample:0 {path}")
    expect(sessions.nth(1)).to_contain_text(training.model_id)
    expect(sessions.nth(1).locator("td.meta")).to_contain_text("<script>window.__pwned=2</script>")
    _shot(page, "5-sessions")
    page.click('nav a[data-page="server"]')
    expect(page.locator("#models")).to_contain_text(server.model)
    expect(page.locator("#main .facts")).to_contain_text("0 pending, 0 running")  # all users' queue, counts only
    # Roles: the api and the worker, both inside this one process (no lease), with its memory.
    roles = page.locator("#roles tbody tr")
    expect(roles).to_have_count(2)
    for role in ("api", "worker"):
        row = page.locator(f'#roles tr[data-role="{role}"]')
        expect(row.locator(".role-state")).to_have_text("in process")
        expect(row.locator(".memory")).to_contain_text("MB")
    expect(page.locator('#roles tr[data-role="worker"]')).to_contain_text(server.model)
    _shot(page, "6-server")

    # Nothing a user wrote ran as script.
    assert page.evaluate("window.__pwned") is None and dialogs == []
    assert not [e for e in errors if "Content Security Policy" in e], errors

    # Bob never sees Alice's runs, not even by their address.
    page.click("#signout")
    _sign_in(page, server.url, BOB)
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    expect(page.locator("#runs")).to_contain_text(bob_run_id)
    assert training.model_id not in page.locator("#main").inner_text()
    page.goto(f"{server.url}/console/#/runs/{training.model_id}")
    expect(page.locator("#main .error")).to_contain_text("unknown")
    # Bob's playground offers the base model and what Alice published, never her private checkpoint; he samples it.
    page.click('nav a[data-page="playground"]')
    expect(page.locator("#pg-model option")).to_have_count(2)
    expect(page.locator('#pg-model optgroup[label="Published by alice"] option')).to_have_text(f"checkpoint {path}")
    assert private not in page.locator("#pg-model").inner_text()
    page.select_option("#pg-model", label=f"checkpoint {path}")
    page.fill("#pg-prompt", "The quick brown fox")
    page.fill("#pg-max_tokens", "5")
    page.click("#pg-sample")
    page.wait_for_selector("#pg-output .sample-card, #pg-output .error", timeout=60_000)
    assert page.locator("#pg-output .error").count() == 0, page.locator("#pg-output").inner_text()
    expect(page.locator(".sample-card .tok")).to_have_count(5)
    page.close()
    assert httpx.get(f"{server.url}/console/api/runs", headers={"X-API-Key": "tml-nobody"}).status_code == 401
