"""The console of a split deployment in a real browser (Debian's headless chromium): `tinkerd api` serves it, its
server page shows the trainer and the sampler from the ledger with their leases, heartbeats and memory, and a worker
that dies turns "gone" on the open page; the playground samples through the sampler process."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tinker
from playwright.sync_api import BrowserContext, expect
from tinker import types

from tests.e2e.browser import SCREENSHOTS, browser_context
from tests.e2e.conftest import API_KEY
from tests.e2e.test_sdk_training import datum
from tests.pg_server import PostgresServer
from tests.split_deployment import SplitDeployment, running

# slow (about 2 minutes): the default run keeps the console's browser test against `serve`, whose server page shows
# the same workers table, and the split deployment's own e2e tests.
pytestmark = [pytest.mark.postgres, pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def deployment(postgres_server: PostgresServer, tiny_model_dir: Path, tmp_path: Path) -> Iterator[SplitDeployment]:
    database_url = postgres_server.create_database("console_split")
    workers = [("trainer", "trainer-a"), ("sampler", "sampler-1")]
    with running(tmp_path, database_url, str(tiny_model_dir), workers, lease_s=4.0) as found:
        yield found


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    with browser_context(tmp_path / "chromium-profile") as context:
        yield context


def _train(deployment: SplitDeployment) -> str:
    service = tinker.ServiceClient(base_url=deployment.url, api_key=API_KEY)
    training = service.create_lora_training_client(base_model=deployment.model, rank=4, seed=0).result()
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    service.close("success").result()
    return training.model_id


def test_the_split_deployments_console_shows_its_workers_live(
    deployment: SplitDeployment, browser: BrowserContext
) -> None:
    with ThreadPoolExecutor(1) as pool:  # the SDK off Playwright's thread (its event loop lives there)
        run_id = pool.submit(_train, deployment).result()
    page = browser.new_page()
    page.goto(f"{deployment.url}/console/")
    page.fill("#api-key", API_KEY)
    page.click("#signin button[type=submit]")
    expect(page.locator("#runs tbody tr")).to_have_count(1)
    expect(page.locator("#runs")).to_contain_text(run_id)

    # The server page: the api, the trainer (holding the run) and the sampler, each live with its lease and memory.
    page.click('nav a[data-page="server"]')
    for worker_id, role in (("trainer-a", "trainer"), ("sampler-1", "sampler")):
        row = page.locator(f'#roles tr[data-id="{worker_id}"]')
        expect(row).to_have_attribute("data-role", role)
        expect(row.locator(".role-state")).to_have_text("live")
        expect(row.locator(".lease")).to_contain_text(" s")
        expect(row.locator(".heartbeat")).to_contain_text("s ago")
        expect(row.locator(".memory")).to_contain_text("MB")
    expect(page.locator('#roles tr[data-role="api"] .role-state')).to_have_text("live")
    expect(page.locator('#roles tr[data-id="trainer-a"] td.num').first).to_have_text("1")  # runs held
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "7-server-split.png"), full_page=True)

    # The playground samples the base model through the sampler process, tokens shaded by logprob.
    page.click('nav a[data-page="playground"]')
    page.fill("#pg-prompt", "The quick brown fox")
    page.fill("#pg-max_tokens", "6")
    page.click("#pg-sample")
    page.wait_for_selector("#pg-output .sample-card, #pg-output .error", timeout=120_000)
    assert page.locator("#pg-output .error").count() == 0, page.locator("#pg-output").inner_text()
    expect(page.locator(".sample-card .tok")).to_have_count(6)

    # A sampler killed outright stops heartbeating: once its lease runs out the open server page says it is gone.
    page.click('nav a[data-page="server"]')
    deployment.kill("sampler-1")
    sampler = page.locator('#roles tr[data-id="sampler-1"]')
    expect(sampler.locator(".role-state")).to_have_text("gone", timeout=30_000)
    expect(sampler.locator(".lease")).to_have_text("–")
    expect(page.locator('#roles tr[data-id="trainer-a"] .role-state')).to_have_text("live")
    page.close()
