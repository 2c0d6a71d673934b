"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright.

The service (App + API) runs in the test's loop; jobs are submitted through the
API. There is no skip: a machine without /usr/bin/chromium fails these tests,
so CI proves the dashboard works (`.ci/run` installs chromium).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dashboard_service import TARGETS, TOKEN, running
from helpers import write_locked
from playwright.async_api import Browser, Page, Response, async_playwright, expect
from tcp_proxy import TcpProxy

from matrixjobs.policy import ADMIN, Caller, Place, Via

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
APPEARS_S = 2.0
DEGRADED = ("Degraded — store: {}. New jobs are refused until the store recovers; running "
            "jobs go on.")
# The probe (every 5 s, a write that may wait up to 5 s) finds a fault and its end.
PROBED_MS = 15_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"the dashboard tests need Debian's chromium at {CHROMIUM} "
                    "(apt-get install chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Browser) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 720})
    page.set_default_timeout(10_000)
    return page


async def log_in(page: Page, url: str, token: str = TOKEN) -> None:
    await page.goto(url)
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Log in").click()


def row(page: Page, job_id: str):
    return page.locator(f'#items tr[data-id="{job_id}"]')


async def bar_value(page: Page, job_id: str) -> int:
    value = await row(page, job_id).get_by_role("progressbar").get_attribute("aria-valuenow")
    return -1 if value is None else int(value)


async def test_a_submitted_job_appears_moves_and_cancels(tmp_path, browser):
    async with running(tmp_path, api={"token": TOKEN}) as svc:
        page = await new_page(browser)
        await log_in(page, svc.url)
        await expect(page.locator("#connection")).to_have_text("live")
        job_id = await svc.submit("slow")
        submitted = time.monotonic()
        await expect(row(page, job_id)).to_be_visible(timeout=APPEARS_S * 1000)
        assert time.monotonic() - submitted < APPEARS_S

        first = await bar_value(page, job_id)
        deadline = time.monotonic() + 5
        while await bar_value(page, job_id) <= max(first, 0):
            assert time.monotonic() < deadline, "the bar did not move"
            await asyncio.sleep(0.1)
        await expect(row(page, job_id)).to_contain_text("running")
        await expect(row(page, job_id)).to_contain_text("elapsed")
        await expect(row(page, job_id)).to_contain_text("attempt 1/3")
        await page.screenshot(path=tmp_path / "dashboard.png", full_page=True)

        await row(page, job_id).get_by_role("link", name=job_id).click()
        await expect(page.get_by_role("heading", level=2)).to_have_text(f"{job_id} slow")
        await page.get_by_role("button", name="Cancel").click()
        await expect(page.locator("#detail-facts")).to_contain_text("cancelled")
        async with svc.client(TOKEN) as client:
            assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "cancelled"
        await expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
        await page.screenshot(path=tmp_path / "job.png", full_page=True)


async def test_wrong_token_shows_the_form_and_no_data(tmp_path, browser):
    async with running(tmp_path, api={"token": TOKEN}) as svc:
        job_id = await svc.submit("slow")
        page = await new_page(browser)
        answers: list[Response] = []
        page.on("response", lambda answer: answers.append(answer))
        await log_in(page, svc.url, "not-the-token")
        await expect(page.get_by_role("alert")).to_have_text("Wrong token.")
        await expect(page.get_by_label("API token")).to_be_visible()
        assert job_id not in await page.content()
        # On the network: / redirecting to the form, the form and its style sheet; no script,
        # no /v1 call, and the form's own source holds no data.
        seen = {(answer.url.rpartition("/")[2], answer.status) for answer in answers}
        assert seen <= {("", 303), ("login", 200), ("login", 401), ("dashboard.css", 200),
                        ("dashboard.css", 304)}, seen

        await log_in(page, svc.url)  # the right token: the data shows
        await expect(row(page, job_id)).to_be_visible()


async def test_filters_and_search(tmp_path, browser):
    async with running(tmp_path) as svc:
        quick = await svc.submit("quick", token=None, agent="matrixjobs-cli/0.1.0")
        slow = await svc.submit("slow", token=None)
        quiet = await svc.submit("quiet", token=None)
        async with svc.client() as client:
            for _ in range(100):
                if (await client.get(f"/v1/jobs/{quick}")).json()["status"] == "completed":
                    break
                await asyncio.sleep(0.05)
        page = await new_page(browser)
        await page.goto(svc.url)
        await expect(row(page, slow)).to_be_visible()
        await expect(row(page, quick)).to_be_hidden()  # default: queued or running only

        await page.get_by_label("State").select_option("")
        await expect(row(page, quick)).to_be_visible()
        await page.get_by_label("Target").select_option("slow")
        await expect(page.locator("#items tbody tr")).to_have_count(1)
        await expect(row(page, slow)).to_be_visible()
        await page.get_by_label("Target").select_option("")
        await page.get_by_label("Requester").select_option("cli")
        await expect(page.locator("#items tbody tr")).to_have_count(1)
        await expect(row(page, quick)).to_be_visible()
        await page.get_by_label("Requester").select_option("")
        await page.get_by_label("State").select_option("completed")
        await expect(page.locator("#items tbody tr")).to_have_count(1)
        await page.get_by_label("State").select_option("")

        await page.get_by_label("Search by id").fill(quiet)
        await expect(page.locator("#items tbody tr")).to_have_count(1)
        await expect(row(page, quiet)).to_be_visible()
        await page.get_by_label("Search by id").press("Enter")
        await expect(page).to_have_url(re.compile(f"#/jobs/{quiet}$"))
        await expect(page.get_by_role("heading", level=2)).to_have_text(f"{quiet} quiet")


async def test_names_and_messages_are_shown_as_text_never_markup(tmp_path, browser):
    markup = "<img src=x id=injected>"
    targets = {"echo": {"command": ["/bin/sh", "-c", f"echo '::progress 1/2 {markup}'; sleep 30"]}}
    async with running(tmp_path, targets=targets) as svc:
        async with svc.client() as client:
            response = await client.post("/v1/batches",
                                         json={"targets": ["echo"], "name": markup})
        batch_id = response.json()["id"]
        page = await new_page(browser)
        await page.goto(svc.url)
        await expect(row(page, batch_id)).to_contain_text(markup)
        await expect(page.locator("#items")).to_contain_text(markup)  # the step message
        assert await page.locator("#injected").count() == 0


async def test_batch_page_lists_its_operations_live(tmp_path, browser):
    async with running(tmp_path) as svc:
        async with svc.client() as client:
            response = await client.post("/v1/batches", json={"targets": ["quick", "slow"]})
        batch_id = response.json()["id"]
        page = await new_page(browser)
        await page.goto(f"{svc.url}/#/batches/{batch_id}")
        operations = page.locator("#operations tbody tr")
        await expect(operations).to_have_count(2)
        await expect(operations.nth(0)).to_contain_text("completed")
        await expect(operations.nth(1)).to_contain_text("running")
        await expect(page.locator("#detail-bar").get_by_role("progressbar")).to_have_attribute(
            "aria-valuenow", re.compile(r"^[1-9]\d*$"))


async def test_a_refused_log_or_rerun_is_said_plainly(tmp_path, browser):
    """What the page says when the service refuses: a log gone with its job (retention),
    a rerun of a target no longer configured (answers as the service gives them)."""
    refusal = json.dumps({"error": {"code": "unknown_target", "message":
                                    "cannot rerun j1: its target 'quick' is no longer "
                                    "configured (available: slow)"}})
    async with running(tmp_path) as svc:
        job_id = await svc.submit("quick", token=None)
        page = await new_page(browser)
        await page.route("**/log?follow=true", lambda route: route.fulfill(status=404))
        await page.route("**/rerun", lambda route: route.fulfill(
            status=404, body=refusal, content_type="application/json"))
        await page.goto(f"{svc.url}/#/jobs/{job_id}")
        await expect(page.locator("#log-text")).to_have_text("log not available")
        await page.get_by_role("button", name="Rerun").click()
        await expect(page.locator("#action-result")).to_have_text(
            "cannot rerun j1: its target 'quick' is no longer configured (available: slow)")


async def test_job_page_shows_the_log_and_rerun_starts_a_new_job(tmp_path, browser):
    async with running(tmp_path) as svc:
        job_id = await svc.submit("quick", token=None)
        page = await new_page(browser)
        await page.goto(f"{svc.url}/#/jobs/{job_id}")
        await expect(page.locator("#log-text")).to_contain_text("built the docs", timeout=5000)
        await page.get_by_role("button", name="Rerun").click()
        await expect(page).not_to_have_url(re.compile(f"#/jobs/{job_id}$"), timeout=5000)
        await expect(page.get_by_role("heading", level=2)).to_contain_text("quick")


async def test_a_locked_store_shows_one_line_until_it_recovers(tmp_path, browser):
    async with running(tmp_path) as svc:
        page = await new_page(browser)
        await page.goto(svc.url)
        await expect(page.locator("#connection")).to_have_text("live")
        banner = page.locator("#degraded")
        await expect(banner).to_be_hidden()
        async with write_locked(svc.app.config.store.path):
            async with svc.client() as client:  # a write meets the lock (after 5 s)
                refused = await client.post("/v1/jobs", json={"target": "quick"})
            assert refused.status_code == 503
            await expect(banner).to_have_text(DEGRADED.format("locked"), timeout=APPEARS_S * 1000)
            await expect(banner).to_have_role("alert")
            await page.screenshot(path=tmp_path / "degraded.png", full_page=True)
        await expect(banner).to_be_hidden(timeout=PROBED_MS)
        await expect(page.locator("#connection")).to_have_text("live")


async def test_a_store_that_cannot_be_read_is_said_and_the_page_comes_back(
        tmp_path, browser, pg_url):
    """PostgreSQL cut off: an open page hears it on its stream; a page opened meanwhile
    cannot get its snapshot, says the service's refusal, and keeps trying until it can."""
    async with TcpProxy("127.0.0.1", 5432) as proxy:
        behind = pg_url.replace(":5432/", f":{proxy.port}/", 1)
        async with running(tmp_path, store={"backend": "postgresql", "url": behind}) as svc:
            page = await new_page(browser)
            await page.goto(svc.url)
            await expect(page.locator("#connection")).to_have_text("live")
            banner = page.locator("#degraded")
            proxy.cut()
            await expect(banner).to_have_text(DEGRADED.format("unreachable"), timeout=PROBED_MS)
            await page.reload()
            await expect(banner).to_have_text("store: unreachable; try again in 10 s")
            await expect(page.locator("#connection")).to_have_text("reconnecting…")
            proxy.restore()
            await expect(page.locator("#connection")).to_have_text("live", timeout=PROBED_MS)
            await expect(banner).to_be_hidden()


async def test_held_work_shows_its_approval_and_the_buttons_approve_or_deny_it(
        tmp_path, browser):
    held = {**TARGETS["quick"], "approvals": 1}
    async with running(tmp_path, targets={**TARGETS, "held": held},
                       access={"allowed_users": ["@alice:example.org"]}) as svc:
        # Asked for by a person: the page (the service token) may approve it, not its own.
        alice = Caller.in_room("@alice:example.org", Place("!room:example.org"))
        approved, denied = [(await svc.app.submit("held", caller=alice)).id for _ in range(2)]
        page = await new_page(browser)
        await page.goto(f"{svc.url}/#/jobs/{approved}")
        await expect(page.locator("#detail-facts")).to_contain_text("awaiting approval 0/1")
        await expect(page.get_by_role("button", name="Cancel")).to_be_enabled()
        await page.get_by_role("button", name="Approve").click()
        await expect(page.locator("#detail-facts")).to_contain_text("approved by admin")
        await expect(page.locator("#detail-facts")).to_contain_text("completed")
        await expect(page.get_by_role("button", name="Approve")).to_be_hidden()

        await page.goto(f"{svc.url}/#/jobs/{denied}")
        await page.get_by_label("reason to deny").fill("not <b>today</b>")
        await page.get_by_role("button", name="Deny").click()
        await expect(page.locator("#detail-facts")).to_contain_text(
            "denied by admin: not <b>today</b>")
        await expect(page.locator("#detail-facts")).to_contain_text("cancelled")


async def test_the_audit_page_lists_who_did_what_and_says_the_chain_holds(tmp_path, browser):
    async with running(tmp_path) as svc:
        job_id = await svc.submit("quick", token=None)
        page = await new_page(browser)
        await page.goto(f"{svc.url}/#/")
        await page.get_by_role("link", name="Audit").click()
        await expect(page.get_by_role("heading", level=2)).to_have_text("Audit log")
        await expect(page.locator("#audit-verdict")).to_have_text(
            re.compile(r"^chain verified: \d+ records$"))
        started = page.locator("#audit tbody tr", has_text=job_id)
        await expect(started).to_contain_text("started")
        await expect(started).to_contain_text("admin")
        await expect(page.locator("#list-view")).to_be_hidden()
        await page.get_by_role("link", name="Jobs", exact=True).click()
        await expect(page.locator("#list-view")).to_be_visible()
        await expect(page.locator("#audit-view")).to_be_hidden()


async def test_a_personal_token_logs_in_and_the_page_says_who(tmp_path, browser):
    async with running(tmp_path, api={"token": TOKEN},
                       access={"allowed_users": ["@alice:example.org"]}) as svc:
        token = await svc.app.issue_token("@alice:example.org", "browser",
                                          Caller(ADMIN, Via.API))
        page = await new_page(browser)
        await log_in(page, svc.url, token)
        await expect(page.locator("#who")).to_have_text("@alice:example.org")
        await expect(page.locator("#connection")).to_have_text("live")
        other = await new_page(browser)
        await log_in(other, svc.url)
        await expect(other.locator("#who")).to_have_text("service token")
