"""Fixtures for the browser tests: Debian's Chromium, a real uvicorn server, one Playwright browser.

Chromium is never downloaded: Playwright drives the system ``chromium`` through
``executable_path``. Without it the tests are skipped, unless
``TOKENGATE_REQUIRE_BROWSER=1`` (set in CI), in which case they fail.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright
from server_process import free_port, server_process

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ADMIN_TOKEN = "test-token"
PREFIX = "/tokengate"
# An exception class name that is markup: the history table shows error class names, so the
# page must render it as text (the app raises it on POST /hostile).
XSS_MARKUP = '<img src=x onerror="window.__tokengate_xss=1">'
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# The machine has no network beyond package registries: keep Chromium from trying.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class DashServer:
    """A running uvicorn serving ``_dash_app`` on 127.0.0.1."""

    base_url: str  # e.g. http://127.0.0.1:43121
    prefix: str
    token: str

    @property
    def admin_url(self) -> str:
        return self.base_url + self.prefix

    def client(self) -> httpx.Client:
        """An httpx client for the server, authenticated as the admin, with bounded timeouts."""
        return httpx.Client(base_url=self.base_url, timeout=10.0,
                            headers={"Authorization": f"Bearer {self.token}"})


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Path of the system Chromium; skips (or fails when TOKENGATE_REQUIRE_BROWSER=1) when absent."""
    path = _find_chromium()
    if path is None:
        reason = ("chromium not found: install Debian's package (apt-get install chromium, "
                  "or run `bash scripts/ensure-debian-package.sh chromium chromium browser-tests`) to run the browser tests")
        if os.environ.get("TOKENGATE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (TOKENGATE_REQUIRE_BROWSER=1 makes this a failure)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def dash_server(chromium_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashServer]:
    """A real uvicorn process on a free 127.0.0.1 port; terminated when the module's tests finish."""
    port = free_port()
    log = tmp_path_factory.mktemp("dash-server") / "uvicorn.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TOKENGATE_ADMIN_TOKEN", None)  # the app passes its token explicitly
    env.update(DASH_ADMIN_TOKEN=ADMIN_TOKEN, DASH_PREFIX=PREFIX, DASH_XSS_MARKUP=XSS_MARKUP)
    cmd = [sys.executable, "-m", "uvicorn", "_dash_app:app", "--app-dir", str(HERE),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with server_process(cmd, cwd=REPO, env=env, log=log, health_path=f"{PREFIX}/health", port=port,
                        startup_timeout=STARTUP_TIMEOUT, stop_timeout=STOP_TIMEOUT) as base_url:
        yield DashServer(base_url=base_url, prefix=PREFIX, token=ADMIN_TOKEN)


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Browser]:
    """One headless Chromium for the module (a fresh context per test keeps sessionStorage apart)."""
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            yield instance
        finally:
            instance.close()
