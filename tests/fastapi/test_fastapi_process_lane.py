"""The process lane through FastAPI: warm start and /ready, worker processes in the admin API, crashes, kill.

Real worker processes (2 per app: one domain, ``process_workers=2``). Nothing
here asserts on time: readiness is polled in a bounded loop, and the one
test that needs "not ready yet" holds the processes' start on an event.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import anyio
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tokengate import OperationsCoordinator, ReputationPolicy, TokenKilled
from tokengate.lanes.process import ChildProcess
from tokengate_fastapi import add_exception_handlers, tokengate_responses

import _fastapi_process_functions as pf

pytestmark = pytest.mark.anyio

P = "/tokengate"
#: Polls of /ready (or of a marker file) before a test gives up; 0.05 s apart, so about 30 s.
MAX_POLLS = 600


def _process_app(make_app: Callable[..., FastAPI], **options: Any) -> FastAPI:
    app = make_app(**{"process_workers": 2, **options})
    add_exception_handlers(app)

    @app.get("/pid", responses=tokengate_responses(process_lane=True))
    async def pid() -> dict[str, int]:
        return {"pid": await pf.worker_pid()}

    @app.get("/crash", responses=tokengate_responses(process_lane=True))
    async def crash() -> dict[str, str]:
        await pf.crash(3)
        return {"result": "unreachable: the function ends its process"}

    return app


async def _wait_ready(client: httpx.AsyncClient) -> httpx.Response:
    for _ in range(MAX_POLLS):
        response = await client.get(f"{P}/ready")
        if response.status_code == 200:
            return response
        assert response.status_code == 503 and response.json()["status"] == "starting", response.text
        await anyio.sleep(0.05)
    raise AssertionError(f"/ready still 503 after {MAX_POLLS} polls: {response.json()}")


def _process_rows(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [w for w in workers if w["lane"] == "process"]


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "coordinator"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def held_process_start(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Worker processes start only once the yielded event is set (always set at teardown)."""
    release = threading.Event()
    real_start = ChildProcess.start

    def start(self: ChildProcess, *args: Any, **kwargs: Any) -> Any:
        release.wait(60)
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(ChildProcess, "start", start)
    yield release
    release.set()


async def test_ready_is_503_starting_until_the_worker_processes_are_up(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], auth: dict[str, str],
        held_process_start: threading.Event) -> None:
    app = _process_app(make_app)
    async with serve(app) as client:
        # Given: the server started, its worker processes held before they start
        # Then: /ready says "starting", with the documented body and Retry-After
        response = await client.get(f"{P}/ready")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json() == {"status": "starting", "ready": False, "pid": os.getpid(),
                                   "processes": 2, "processes_ready": 0}
        assert (await client.get(f"{P}/health")).status_code == 200  # liveness never depends on it
        # When: the processes may start (no request has asked for one: the lifespan started them warm)
        held_process_start.set()
        ready = await _wait_ready(client)
        # Then: /ready is 200 with every process up, and a process-lane call runs in one of them
        assert ready.json() == {"status": "ready", "ready": True, "pid": os.getpid(), "processes": 2,
                                "processes_ready": 2}
        pid = (await client.get("/pid")).json()["pid"]
        workers = (await client.get(f"{P}/workers", headers=auth)).json()
        assert pid != os.getpid() and pid in {w["process"]["pid"] for w in _process_rows(workers)}


async def test_the_admin_api_shows_each_worker_process(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                       auth: dict[str, str]) -> None:
    app = _process_app(make_app, policies=[ReputationPolicy()])
    async with serve(app) as client:
        await _wait_ready(client)
        assert (await client.get("/pid")).status_code == 200
        # /workers: thread workers first, then one row per worker process with its figures
        workers = (await client.get(f"{P}/workers", headers=auth)).json()
        assert [w["lane"] for w in workers] == ["thread", "thread", "process", "process"]
        assert all(w["process"] is None for w in workers if w["lane"] == "thread")
        for row in _process_rows(workers):
            process = row["process"]
            assert row["core_id"] == 1 and row["worker_id"].startswith("core1-")
            assert process["state"] == "idle" and process["pid"] > 0 and process["rss_bytes"] > 0
            assert process["startup_seconds"] > 0
            assert process["crashes"] == process["terminations"] == process["recycles"] == process["restarts"] == 0
        assert sum(row["process"]["calls"] for row in _process_rows(workers)) == 1
        # /stats: the lane's own domains, queues, routing and readiness
        stats = (await client.get(f"{P}/stats", headers=auth)).json()
        lane = stats["lanes"]["process"]
        assert lane["lane"] == "process" and lane["ready"] is True
        assert [w["worker_id"] for core in lane["cores"] for w in core["workers"]] == \
            [w["worker_id"] for w in _process_rows(workers)]
        assert all(w["lane"] == "thread" for core in stats["cores"] for w in core["workers"])
        # /history and /operations: the lane each call ran on
        history = (await client.get(f"{P}/history", headers=auth)).json()
        assert [(r["operation_type"], r["lane"]) for r in history] == [("fxp.pid", "process")]
        operations = (await client.get(f"{P}/operations", headers=auth)).json()
        assert [(o["operation_type"], o["lane"]) for o in operations] == [("fxp.pid", "process")]
        # /metrics: live processes by state, and the counters (all 0 so far)
        metrics = _metrics((await client.get(f"{P}/metrics", headers=auth)).text)
        assert metrics[("tokengate_process_workers_live", ())] == 2.0
        assert metrics[("tokengate_process_workers", (("state", "idle"),))] == 2.0
        assert metrics[("tokengate_process_crashes_total", ())] == 0.0
        assert len([k for k in metrics if k[0] == "tokengate_process_rss_bytes"]) == 2


async def test_a_crash_answers_502_worker_crashed_and_the_next_request_works(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], auth: dict[str, str]) -> None:
    app = _process_app(make_app, policies=[ReputationPolicy()])
    async with serve(app) as client:
        await _wait_ready(client)
        pids = {w["process"]["pid"] for w in _process_rows((await client.get(f"{P}/workers", headers=auth)).json())}
        # When: the function ends its worker process (os._exit) while running
        crashed = await client.get("/crash")
        # Then: that request gets the documented error body
        assert crashed.status_code == 502
        body = crashed.json()
        assert body["error"] == "worker_crashed" and body["exitcode"] == 3 and body["pid"] in pids
        assert "retry-after" not in crashed.headers  # the call may have run partly: not blindly retryable
        # and every later request is served (the crashed process is replaced before its next call)
        later = [(await client.get("/pid")) for _ in range(6)]
        assert [r.status_code for r in later] == [200] * 6
        assert body["pid"] not in {r.json()["pid"] for r in later}
        # The admin API counts the crash once, on the worker whose process died
        rows = _process_rows((await client.get(f"{P}/workers", headers=auth)).json())
        assert sorted(row["process"]["crashes"] for row in rows) == [0, 1]
        metrics = _metrics((await client.get(f"{P}/metrics", headers=auth)).text)
        assert metrics[("tokengate_process_crashes_total", ())] == 1.0
        assert metrics[("tokengate_process_restarts_total", ())] == sum(r["process"]["restarts"] for r in rows)
        history = (await client.get(f"{P}/history", headers=auth)).json()
        failed = [r for r in history if r["operation_type"] == "fxp.crash"]
        assert len(failed) == 1 and failed[0]["state"] == "failed" and failed[0]["lane"] == "process"
        assert "WorkerCrashed" in failed[0]["error"]


async def test_an_operator_kills_a_running_process_lane_call(make_app: Callable[..., FastAPI],
                                                            serve: Callable[..., Any], auth: dict[str, str],
                                                            tmp_path: Path) -> None:
    app = _process_app(make_app)
    async with serve(app) as client:
        await _wait_ready(client)
        # Given: a process-lane call that is running (it wrote its pid) and would sleep for a minute
        marker = tmp_path / "pid"
        token = pf.block(str(marker))
        for _ in range(MAX_POLLS):
            if marker.exists() and marker.read_text():
                break
            await anyio.sleep(0.05)
        pid = int(marker.read_text())
        # When: an operator kills it through the admin API
        response = await client.post(f"{P}/tokens/{token.token_id}/kill", headers=auth)
        # Then: unlike a thread, it is stopped: its process is ended, the awaiter gets TokenKilled
        assert response.status_code == 200, response.text
        assert response.json()["killed"] is True and "worker process" in response.json()["message"]
        with pytest.raises(TokenKilled):
            await token
        # the worker thread notices its process ended after the token settled: wait (bounded) for it to count it
        for _ in range(MAX_POLLS):
            rows = _process_rows((await client.get(f"{P}/workers", headers=auth)).json())
            if sum(row["process"]["terminations"] for row in rows) == 1:
                break
            await anyio.sleep(0.05)
        assert sum(row["process"]["terminations"] for row in rows) == 1
        assert pid not in {(await client.get("/pid")).json()["pid"] for _ in range(4)}


async def test_warm_processes_false_is_respected(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                 auth: dict[str, str]) -> None:
    app = _process_app(make_app, warm_processes=False)
    async with serve(app) as client:
        # Given: the user chose processes on demand; after startup no worker process exists
        rows = _process_rows((await client.get(f"{P}/workers", headers=auth)).json())
        assert len(rows) == 2 and all(row["process"] is None or row["process"]["pid"] is None for row in rows)
        # When / Then: the first process-lane call starts one
        assert (await client.get("/pid")).status_code == 200


async def test_ready_with_processes_on_demand(make_app: Callable[..., FastAPI], serve: Callable[..., Any]) -> None:
    # Regression (found here, fixed in the core in 6cd8f53): /ready stayed 503 until the first process-lane call.
    app = _process_app(make_app, warm_processes=False)
    async with serve(app) as client:
        # Processes start at the first call, so a server is ready without them
        ready = await client.get(f"{P}/ready")
        assert ready.status_code == 200 and ready.json()["processes"] == 2, ready.text


def test_core_warm_processes_without_a_process_lane_starts() -> None:
    # Regression (found here, fixed in the core in 6cd8f53): start() raised KeyError 'process'.
    coordinator = OperationsCoordinator(num_cores=1, workers_per_core=1, policies=[], process_workers=0,
                                        warm_processes=True, name="tgtest-warm0")
    coordinator.start()
    coordinator.stop()


def test_process_lane_responses_are_documented() -> None:
    responses = tokengate_responses(process_lane=True)
    assert {409, 422, 500, 502, 503, 504} == set(responses)
    assert "worker_crashed" in responses[502]["description"]
    assert "worker_start_failed" in responses[503]["description"]
    both = tokengate_responses(process_lane=True, function_failed=True)[500]["description"]
    assert "function_failed" in both and "pickling_failed" in both
    assert 502 not in tokengate_responses()
    with pytest.raises(ValueError):
        tokengate_responses(process_lane="yes")  # type: ignore[arg-type]
