"""The live dashboard in a real browser: login, live numbers, drain/resume, auth failures, XSS.

Headless Debian Chromium driven by Playwright against a real uvicorn server (see conftest.py).
Every wait is bounded; nothing asserts on timing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from .conftest import XSS_MARKUP, DashServer

pytestmark = pytest.mark.browser

UI_TIMEOUT_MS = 10_000  # generous: SSE ticks every ~1 s and readiness is polled every 2 s
TOKEN_KEY = "tokengate.admin_token"
expect.set_options(timeout=UI_TIMEOUT_MS)


@dataclass
class Tab:
    page: Page
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page's scripts


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    """A fresh browser context (own sessionStorage), closed after the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    tab = Tab(page)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    try:
        yield tab
    finally:
        context.close()


def _login(page: Page, server: DashServer, token: str) -> None:
    page.goto(server.admin_url + "/dashboard")
    page.get_by_test_id("login-token").fill(token)
    page.get_by_test_id("login-submit").click()


def _count(page: Page, name: str) -> int:
    text = page.get_by_test_id(f"count-{name}").inner_text()
    return int(text.replace(",", ""))


def _wait_count_at_least(page: Page, name: str, target: int) -> None:
    page.wait_for_function(
        """([id, target]) => {
            const n = document.querySelector(`[data-testid="${id}"]`);
            return n !== null && Number(n.textContent.replace(/,/g, "")) >= target;
        }""",
        arg=[f"count-{name}", target],
        timeout=UI_TIMEOUT_MS,
    )


def test_live_counts_drain_and_resume(tab: Tab, dash_server: DashServer, tmp_path: Path) -> None:
    page = tab.page
    with dash_server.client() as http:
        try:
            # Given: a signed-in dashboard receiving the event stream
            _login(page, dash_server, dash_server.token)
            expect(page.get_by_test_id("conn-status")).to_have_text("Live", timeout=UI_TIMEOUT_MS)
            expect(page.get_by_test_id("count-completed")).to_have_text(re.compile(r"^\d[\d,]*$"))
            expect(page.get_by_test_id("ready-status")).to_have_text("Ready")
            before = _count(page, "completed")

            # When: the server runs 25 calls
            assert http.post("/work", params={"n": 25}).json() == {"done": 25}

            # Then: the completed count moves by at least 25 without a reload, and the work shows up
            _wait_count_at_least(page, "completed", before + 25)
            expect(page.get_by_test_id("history-table")).to_contain_text("dash_square")
            cores = page.get_by_test_id("cores")
            expect(cores.locator(".core")).to_have_count(2)  # the app runs num_cores=2
            expect(cores).to_contain_text(re.compile(r"light [1-9]"))  # the light calls' affinity bar
            expect(page.locator('[data-operation="dash_square"]')).to_contain_text("25")  # reputation row
            assert page.get_by_test_id("count-accepted").inner_text() != "–"
            # the token lives in sessionStorage only: no localStorage, no cookies
            assert page.evaluate(f"sessionStorage.getItem({TOKEN_KEY!r})") == dash_server.token
            assert page.evaluate("localStorage.length") == 0
            assert page.context.cookies() == []
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

            # When: Drain is clicked
            page.get_by_test_id("btn-drain").click()
            # Then: the readiness indicator and the server both say 503
            expect(page.get_by_test_id("ready-status")).to_have_text("Not ready (draining)")
            assert http.get(dash_server.prefix + "/ready").status_code == 503
            expect(page.get_by_test_id("phase")).to_contain_text("draining")

            # When: Resume is clicked
            page.get_by_test_id("btn-resume").click()
            # Then: ready again
            expect(page.get_by_test_id("ready-status")).to_have_text("Ready")
            assert http.get(dash_server.prefix + "/ready").status_code == 200
            assert tab.errors == []
        finally:
            http.post(dash_server.prefix + "/resume")  # never leave the shared server drained


def test_wrong_token_shows_login_error(tab: Tab, dash_server: DashServer) -> None:
    page = tab.page
    # Given: the login form
    # When: a wrong token is submitted
    _login(page, dash_server, "not-the-token")
    # Then: the form stays, says why, and nothing is stored
    expect(page.get_by_test_id("login-error")).to_contain_text("rejected")
    expect(page.get_by_test_id("login-token")).to_be_visible()
    expect(page.get_by_test_id("btn-drain")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    assert tab.errors == []


def test_stored_token_that_is_refused_returns_to_login(tab: Tab, dash_server: DashServer) -> None:
    page = tab.page
    # Given: a tab whose session holds a token the server no longer accepts
    page.add_init_script(f"sessionStorage.setItem({TOKEN_KEY!r}, 'stale-token')")
    # When: the dashboard opens with it
    page.goto(dash_server.admin_url + "/dashboard")
    # Then: a 401 sends it back to the login form with a message
    expect(page.get_by_test_id("login-error")).to_contain_text("401")
    expect(page.get_by_test_id("login-token")).to_be_visible()
    assert tab.errors == []


def test_server_strings_are_rendered_as_text(tab: Tab, dash_server: DashServer) -> None:
    page = tab.page
    with dash_server.client() as http:
        # Given: a failed call whose error class name is an <img onerror=...> tag
        assert http.post("/hostile").json() == {"failed": True}
        # When: the dashboard shows it in the recent executions
        _login(page, dash_server, dash_server.token)
        history = page.get_by_test_id("history-table")
        expect(history).to_contain_text(XSS_MARKUP)
        # Then: it is text, not an element, and its handler never ran
        assert history.locator("img").count() == 0
        assert page.evaluate("window.__tokengate_xss === undefined")
    assert tab.errors == []


def test_quarantine_release_and_discard(tab: Tab, dash_server: DashServer) -> None:
    page = tab.page
    ops = dash_server.prefix + "/operations/dash_held"
    with dash_server.client() as http:
        try:
            # Given: two calls of an operation on hold, so both wait in the quarantine
            assert http.post(ops + "/hold").status_code == 200
            first = http.post("/held", params={"x": 1}).json()["quarantine_id"]
            second = http.post("/held", params={"x": 2}).json()["quarantine_id"]
            assert first and second
            _login(page, dash_server, dash_server.token)
            expect(page.get_by_test_id(f"quarantine-{first}")).to_contain_text("held_operation")
            expect(page.get_by_test_id(f"quarantine-{second}")).to_be_visible()

            # When: the first is released
            page.get_by_test_id(f"btn-release-{first}").click()
            # Then: it runs, leaves the pending list, and the server records it as released
            expect(page.get_by_test_id(f"quarantine-{first}")).to_have_count(0)
            assert http.get(dash_server.prefix + f"/quarantine/{first}").json()["status"] == "released"

            # When: Discard is clicked once, then confirmed
            discard = page.get_by_test_id(f"btn-discard-{second}")
            discard.click()
            expect(discard).to_have_text("Confirm discard")  # the first click only asks
            discard.click()
            # Then: it is gone from the page and discarded on the server
            expect(page.get_by_test_id(f"quarantine-{second}")).to_have_count(0)
            assert http.get(dash_server.prefix + f"/quarantine/{second}").json()["status"] == "discarded"
            assert tab.errors == []
        finally:
            http.post(ops + "/unhold")


def test_process_workers_and_a_contained_crash(tab: Tab, dash_server: DashServer) -> None:
    page = tab.page
    with dash_server.client() as http:
        # Given: a signed-in dashboard; the app's two worker processes started with the server
        _login(page, dash_server, dash_server.token)
        expect(page.get_by_test_id("ready-status")).to_have_text("Ready")
        table = page.get_by_test_id("processes-table")
        expect(table.locator("tbody tr")).to_have_count(2)
        workers = [w for w in http.get(dash_server.prefix + "/workers").json() if w["lane"] == "process"]
        for worker in workers:
            row = page.get_by_test_id("process-" + worker["worker_id"])
            expect(row).to_contain_text(str(worker["process"]["pid"]))
        expect(page.get_by_test_id("processes-note")).to_contain_text("2 of 2 worker processes up")
        assert isinstance(http.post("/pid").json()["pid"], int)

        # When: a process-lane call kills its worker process
        dead = http.post("/crash").json()["crashed_pid"]
        # Then: the dashboard shows the crash on the worker that owned it, and the lane in the tables
        victim = next(w["worker_id"] for w in workers if w["process"]["pid"] == dead)
        expect(page.get_by_test_id("process-crashes-" + victim)).to_have_text("1")
        expect(page.locator('[data-operation="dash_crash"]')).to_contain_text("process")
        expect(page.get_by_test_id("history-table")).to_contain_text("WorkerCrashed")
        # and the next process-lane call is served
        assert isinstance(http.post("/pid").json()["pid"], int)
    assert tab.errors == []
