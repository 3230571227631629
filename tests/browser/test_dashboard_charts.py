"""The dashboard's history charts in a real browser: they render, update live, and show a drain and a flood.

Headless Debian Chromium driven by Playwright against a real uvicorn serving
``_series_app`` (series sampled every 0.2 s). Every wait is bounded polling
(Playwright's ``wait_for_function`` / ``expect``); nothing asserts on timing.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator, Literal

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from server_process import free_port, server_process

from .conftest import ADMIN_TOKEN, HERE, PREFIX, REPO, STARTUP_TIMEOUT, STOP_TIMEOUT

pytestmark = pytest.mark.browser

UI_TIMEOUT_MS = 15_000
LOAD_SECONDS = 20.0  # bound on every load loop below
expect.set_options(timeout=UI_TIMEOUT_MS)
CHARTS = ("throughput", "queue-wait", "run-time", "pending", "busy", "refusals")


@pytest.fixture(scope="module")
def charts_url(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn serving ``_series_app`` on a free 127.0.0.1 port; its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("charts-server") / "uvicorn.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DASH_ADMIN_TOKEN": ADMIN_TOKEN, "DASH_PREFIX": PREFIX}
    env.pop("TOKENGATE_ADMIN_TOKEN", None)
    cmd = [sys.executable, "-m", "uvicorn", "_series_app:app", "--app-dir", str(HERE),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with server_process(cmd, cwd=REPO, env=env, log=log, health_path=f"{PREFIX}/health", port=port,
                        startup_timeout=STARTUP_TIMEOUT, stop_timeout=STOP_TIMEOUT) as base_url:
        yield base_url


def _client(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, timeout=10.0, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def _open(browser: Browser, base_url: str, errors: list[str],
          color_scheme: Literal["light", "dark"] = "light") -> Page:
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, color_scheme=color_scheme)
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base_url + PREFIX + "/dashboard")
    page.get_by_test_id("login-token").fill(ADMIN_TOKEN)
    page.get_by_test_id("login-submit").click()
    expect(page.get_by_test_id("conn-status")).to_have_text("Live")
    return page


def _value(page: Page, chart: str, key: str) -> float | None:
    raw = page.get_by_test_id(f"series-{chart}-{key}").get_attribute("data-value")
    return None if raw in (None, "") else float(raw)


def _load_until(page: Page, http: httpx.Client, path: str, condition: str, arg: object) -> None:
    """POST *path* repeatedly until the page's *condition* holds (bounded in count and time)."""
    deadline = time.monotonic() + LOAD_SECONDS
    for _ in range(2000):
        assert http.post(path).status_code == 200
        if page.evaluate(condition, arg):
            return
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"the page never showed {condition!r} ({arg!r}) under load on {path}")


_ABOVE_ZERO = """([id]) => {
    const n = document.querySelector(`[data-testid="${id}"]`);
    return n !== null && Number(n.dataset.value || 0) > 0;
}"""


def test_charts_render_update_live_and_show_a_drain(browser: Browser, charts_url: str, tmp_path: Path) -> None:
    errors: list[str] = []
    page = _open(browser, charts_url, errors)
    with _client(charts_url) as http:
        try:
            # Given: the signed-in dashboard; the server has sampled since it started
            section = page.get_by_test_id("charts")
            for chart in CHARTS:
                figure = page.get_by_test_id(f"chart-{chart}")
                expect(figure).to_be_visible()
                image = figure.locator("svg[role=img]")
                expect(image).to_have_attribute("aria-labelledby", f"chart-{chart}-title chart-{chart}-desc")
            expect(section).to_contain_text("last 60 s, a point every 0.2 s")
            expect(page.get_by_test_id("chart-throughput").locator("desc")).to_contain_text("Latest:")

            # When: light and heavy calls run
            # Then: the throughput chart's lines rise for both classes, without a reload
            _load_until(page, http, "/work", _ABOVE_ZERO, ["series-throughput-light"])
            _load_until(page, http, "/work", _ABOVE_ZERO, ["series-throughput-heavy"])
            assert page.get_by_test_id("chart-throughput").locator("path.s-light").count() == 1
            expect(page.get_by_test_id("chart-run-time").locator("path.s-c2")).to_have_count(1)  # p99 drawn

            # And: new points keep arriving (the page appends them as the server samples)
            seq = int(page.get_by_test_id("chart-throughput").get_attribute("data-last-seq") or "-1")
            page.wait_for_function("""([seq]) => Number(document.querySelector('[data-testid="chart-throughput"]')
                                       .dataset.lastSeq) > seq + 2""", arg=[seq])
            page.screenshot(path=str(tmp_path / "charts-under-load.png"), full_page=True)

            # When: Drain is clicked while the clients keep calling (their calls are refused)
            page.get_by_test_id("btn-drain").click()
            expect(page.get_by_test_id("phase")).to_contain_text("draining")
            # Then: throughput falls to zero, and the charts shade the closed gate
            deadline = time.monotonic() + LOAD_SECONDS
            for _ in range(2000):
                body = http.post("/work", params={"n": 5}).json()
                assert body["done"] == 0 and body["refused"] == 10
                if page.evaluate("""() => {
                        const t = document.querySelector('[data-testid="series-throughput-total"]');
                        return t !== null && t.dataset.value === "0"; }"""):
                    break
                assert time.monotonic() < deadline, "throughput never reached zero after the drain"
            expect(page.get_by_test_id("chart-throughput").locator("rect.band")).to_have_count(1)
            expect(page.get_by_test_id("charts-note")).to_contain_text("gate closed")
            expect(page.get_by_test_id("chart-throughput").locator("desc")).to_contain_text("The gate is closed")
            page.screenshot(path=str(tmp_path / "charts-drained.png"), full_page=True)
        finally:
            http.post(PREFIX + "/resume")
            page.context.close()
    assert errors == []


def test_refusals_rise_under_a_burst_and_the_dark_theme_applies(browser: Browser, charts_url: str) -> None:
    errors: list[str] = []
    page = _open(browser, charts_url, errors, color_scheme="dark")
    with _client(charts_url) as http:
        try:
            # Given: a page opened after the earlier test's load: the server-side window holds the past
            expect(page.get_by_test_id("chart-throughput")).not_to_have_attribute("data-points", "0")
            # When: bursts overflow the light class's queues (8 places for 30 calls)
            # Then: the refusals chart shows overloaded calls per second
            _load_until(page, http, "/burst", _ABOVE_ZERO, ["series-refusals-overloaded"])
            expect(page.get_by_test_id("chart-refusals").locator("path.s-c1")).to_have_count(1)
            # the dark theme's colours (the light class's line is --light of the dark palette)
            stroke = page.evaluate("""() => getComputedStyle(
                document.querySelector('[data-testid="chart-throughput"] path.s-light')).stroke""")
            assert stroke == "rgb(93, 173, 226)"
        finally:
            page.context.close()
    assert errors == []
