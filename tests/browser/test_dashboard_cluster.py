"""The dashboard's cluster panel in a real browser: an app whose Dask lane is connected to a real scheduler.

The scheduler and its worker run in the test process on a fixed 127.0.0.1 port (``tests/dask_host.py``),
the app in a uvicorn subprocess; the test stops the scheduler and the panel must say so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import httpx

import pytest

pytest.importorskip("distributed")

from playwright.sync_api import Browser, expect  # noqa: E402

from dask_host import SchedulerHost, started_host  # noqa: E402
from server_process import free_port, server_process  # noqa: E402

from .conftest import ADMIN_TOKEN, CHROMIUM_ARGS, HERE, PREFIX, REPO, STARTUP_TIMEOUT, STOP_TIMEOUT  # noqa: E402
from .test_dashboard import UI_TIMEOUT_MS  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def host() -> Iterator[SchedulerHost]:
    with started_host() as h:
        yield h


def test_cluster_panel_shows_the_connection_workers_and_a_lost_scheduler(
        browser: Browser, host: SchedulerHost, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DASH_ADMIN_TOKEN": ADMIN_TOKEN, "DASH_PREFIX": PREFIX,
           "DASH_DASK_ADDRESS": host.address}
    env.pop("TOKENGATE_ADMIN_TOKEN", None)
    cmd = [sys.executable, "-m", "uvicorn", "_cluster_app:app", "--app-dir", str(HERE),
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = tmp_path / "uvicorn.log"
    with server_process(cmd, cwd=REPO, env=env, log=log, health_path=f"{PREFIX}/health", port=port,
                        startup_timeout=STARTUP_TIMEOUT, stop_timeout=STOP_TIMEOUT) as base_url:
        with httpx.Client(base_url=base_url, timeout=10.0) as http:
            assert http.post("/double/21").json() == {"value": 42}
        context = browser.new_context()
        page = context.new_page()
        errors: list[str] = []
        scheduler_gone = False
        page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") and not (
            # With the scheduler gone, /ready answers 503 cluster_unavailable: documented, expected.
            scheduler_gone and "status of 503" in m.text) else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            # Given a signed-in dashboard of an app with a connected Dask lane
            page.goto(base_url + PREFIX + "/dashboard")
            page.get_by_test_id("login-token").fill(ADMIN_TOKEN)
            page.get_by_test_id("login-submit").click()
            # Then the cluster panel shows the connection, the scheduler and the worker with its resources
            section = page.get_by_test_id("cluster")
            expect(section).to_be_visible(timeout=UI_TIMEOUT_MS)
            expect(page.get_by_test_id("cluster-note")).to_contain_text("connected (required)")
            expect(page.get_by_test_id("cluster-note")).to_contain_text(host.address)
            rows = page.get_by_test_id("cluster-worker")
            expect(rows).to_have_count(1)
            expect(rows.first).to_contain_text("heavy=1, medium=1, light=1")
            page.screenshot(path=str(tmp_path / "cluster-connected.png"), full_page=True)
            # When the scheduler goes away
            scheduler_gone = True
            host.stop_scheduler()
            host.stop_worker()
            # Then the panel says the lane is unavailable
            expect(page.get_by_test_id("cluster-note")).to_contain_text("unavailable", timeout=UI_TIMEOUT_MS * 2)
        finally:
            context.close()
    assert errors == []
