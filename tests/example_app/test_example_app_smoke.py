"""The example app in-process: every endpoint answers as its README documents.

The app runs under ``asgi_lifespan.LifespanManager`` with ``httpx.ASGITransport``
(no sockets); its quarantine database lives in ``tmp_path``. This directory has
no ``__init__.py`` on purpose: as a package it would be named ``example_app``
and shadow the real one.
"""

from __future__ import annotations

import asyncio
import os

import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from example_app.__main__ import admin_token, banner
from example_app.app import CPU_MAX_N, NUM_CORES, PROCESS_WORKERS, create_app
from example_app.work import crunch

pytestmark = pytest.mark.anyio

TOKEN = "smoke-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
P = "/tokengate"
Client = Callable[..., Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[[], FastAPI]:
    """A fresh example app whose quarantine file is in tmp_path."""
    return lambda: create_app(admin_token=TOKEN, quarantine_path=str(tmp_path / "quarantine.sqlite3"))


@pytest.fixture
def serve(make_app: Callable[[], FastAPI]) -> Callable[..., Any]:
    """``async with serve() as client``: run an example app's lifespan (a fresh app unless one is given)."""

    @asynccontextmanager
    async def run(app: FastAPI | None = None) -> AsyncIterator[httpx.AsyncClient]:
        app = app or make_app()
        async with LifespanManager(app, startup_timeout=10, shutdown_timeout=20) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://example", timeout=30) as client:
                yield client

    return run


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get(f"{P}/stats", headers=AUTH)
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


async def test_index_lists_endpoints_and_admin(serve: Client) -> None:
    async with serve() as client:
        body = (await client.get("/")).json()
    assert body["coordinator"]["cores"] == NUM_CORES
    assert body["coordinator"]["policies"] == ["reputation", "quarantine", "sticky", "conductor", "convergence",
                                               "storage_tiers", "retries"]
    routes = " ".join(e["route"] for e in body["endpoints"])
    for path in ("/light", "/medium", "/heavy", "/io", "/sticky/", "/ordered/", "/chain", "/process", "/flaky",
                 "/fail", "/slow", "/jobs/slow", "/cpu", "/crash"):
        assert path in routes
    assert body["coordinator"]["process_workers"] == PROCESS_WORKERS
    assert body["admin"]["dashboard"] == f"{P}/dashboard"


async def test_weight_endpoints_run_on_their_classes_domains(serve: Client) -> None:
    async with serve() as client:
        routing = (await stats(client))["routing"]["allowed"]
        # When: each weight endpoint is called
        light = (await client.get("/light", params={"n": 100})).json()
        medium = (await client.get("/medium", params={"rounds": 3})).json()
        heavy = (await client.get("/heavy", params={"ms": 0})).json()
        io = (await client.get("/io", params={"kb": 3, "ms": 0})).json()
    # Then: the results are right and each call ran, completed, on a domain its class may use
    assert light["result"] == sum(i * i for i in range(100))
    assert len(medium["result"]) == 64
    assert heavy["slept_ms"] == 0
    assert io["result"]["bytes"] == 3 * 1024 and io["result"]["intact"] is True
    for answer, weight in ((light, "light"), (medium, "medium"), (heavy, "heavy"), (io, "medium")):
        assert answer["state"] == "completed" and answer["weight"] == weight and answer["attempt"] == 1
        assert answer["core_id"] in routing[weight]
        assert answer["worker_id"].startswith(f"core{answer['core_id']}-w")
    assert io["operation_type"] == "example.disk_roundtrip"


async def test_io_takes_a_slot_of_the_slow_tier(serve: Client) -> None:
    async with serve() as client:
        assert (await client.get("/io", params={"kb": 1, "ms": 0})).status_code == 200
        tiers = (await stats(client))["policies"]["storage_tiers"]["tiers"]
    assert tiers["slow"]["limit"] == 2 and tiers["slow"]["total"] == 1 and tiers["slow"]["active"] == 0


async def test_sticky_calls_of_one_user_share_a_core(serve: Client) -> None:
    async with serve() as client:
        # When: 8 overlapping calls for one user (all submitted before any settles)
        body = (await client.get("/sticky/alice", params={"calls": 8})).json()
        sticky = (await stats(client))["policies"]["sticky"]
    # Then: one core for all of them, and the policy pinned the 7 after the first
    assert body["same_core"] is True and len(set(body["core_ids"])) == 1 and len(body["core_ids"]) == 8
    assert all(call["state"] == "completed" for call in body["calls"])
    assert sticky["pinned_routes"] >= 7 and sticky["pins"] == 0  # pins are released at settle


async def test_ordered_calls_of_one_account_run_in_submission_order(serve: Client) -> None:
    account = f"acct-{uuid.uuid4().hex}"
    async with serve() as client:
        body = (await client.get(f"/ordered/{account}", params={"calls": 10})).json()
    # Then: no lost update (a racy read-modify-write) and submission order kept
    assert body["sequence"] == list(range(1, 11)) and body["in_order"] is True


async def test_chain_runs_the_lead_and_its_children_on_one_core(serve: Client) -> None:
    async with serve() as client:
        body = (await client.get("/chain", params={"parts": 5})).json()
        conductor = (await stats(client))["policies"]["conductor"]
    assert body["all_same_core"] is True and len(body["core_ids"]) == 6
    assert {c["core_id"] for c in body["children"]} == {body["lead"]["core_id"]}
    assert [c["value"] for c in body["children"]] == [i * i for i in range(5)]
    assert isinstance(body["seed"], str) and len(body["seed"]) == 64
    assert conductor["members_total"] >= 5 and conductor["domains"] == 0


async def test_process_spike_is_quarantined_listed_released_and_held(serve: Client,
                                                                     make_app: Callable[[], FastAPI]) -> None:
    app = make_app()
    async with serve(app) as client:
        # Given: the 5 warm-up calls that teach the quarantine the usual size
        for i in range(5):
            ok = await client.post("/process", json={"items": [i, 1, 2]})
            assert ok.status_code == 200 and ok.json()["result"]["count"] == 3
        # When: a batch far bigger than usual arrives
        spike = await client.post("/process", json={"items": list(range(5000))})
        # Then: 409, held for review, listed by the admin API
        assert spike.status_code == 409
        assert spike.json()["error"] == "token_quarantined" and spike.json()["trigger"] == "argument_spike"
        qid = spike.json()["quarantine_id"]
        pending = (await client.get(f"{P}/quarantine", params={"status": "pending"}, headers=AUTH)).json()
        assert [r["id"] for r in pending] == [qid]
        assert (await client.get(f"{P}/quarantine/{qid}", headers=AUTH)).json()["trigger"] == "argument_spike"
        # When: released, Then: it runs as a new token and the record becomes released
        released = (await client.post(f"{P}/quarantine/{qid}/release", headers=AUTH)).json()
        coordinator = app.state.tokengate
        token = coordinator.get_token(released["token_id"])
        if token is not None:  # still running: wait for it (it may have finished already)
            assert (await token)["count"] == 5000
        # the outcome is stored by the quarantine's writer thread just after the call settles
        assert await asyncio.to_thread(coordinator.policy("quarantine").flush, 10.0)
        record = (await client.get(f"{P}/quarantine/{qid}", headers=AUTH)).json()
        assert record["status"] == "released" and record["outcome_ok"] is True
        assert (await client.delete(f"{P}/quarantine/{qid}", headers=AUTH)).status_code == 409
        # When: the operation is held, Then: a normal call is quarantined too, and can be discarded
        await client.post(f"{P}/operations/example.process_batch/hold", headers=AUTH)
        held = await client.post("/process", json={"items": [1]})
        assert held.status_code == 409 and held.json()["trigger"] == "held_operation"
        await client.post(f"{P}/operations/example.process_batch/unhold", headers=AUTH)
        discarded = await client.delete(f"{P}/quarantine/{held.json()['quarantine_id']}", headers=AUTH)
        assert discarded.status_code == 200 and discarded.json()["status"] == "discarded"
        assert (await client.post("/process", json={"items": [1]})).status_code == 200


async def test_flaky_succeeds_after_retries_on_the_same_token(serve: Client) -> None:
    async with serve() as client:
        retried = (await client.get("/flaky", params={"fail_times": 3})).json()
        first_time = (await client.get("/flaky", params={"fail_times": 0})).json()
        retries = (await stats(client))["policies"]["retries"]
    assert retried["state"] == "completed" and retried["attempt"] == 4 and retried["result"] == {"runs": 4}
    assert first_time["attempt"] == 1
    assert retries["scheduled"] == 3 and retries["succeeded_after_retry"] == 1


async def test_fail_is_auto_blocked_then_unblocked(serve: Client) -> None:
    async with serve() as client:
        # Given: five failures in a row (each one ran and failed)
        for _ in range(5):
            failed = await client.get("/fail")
            assert failed.status_code == 500
            assert failed.json()["error"] == "function_failed" and failed.json()["state"] == "failed"
        # Then: the next call is refused before it runs
        blocked = await client.get("/fail")
        assert blocked.status_code == 503 and blocked.json()["error"] == "operation_blocked"
        assert "retry-after" in blocked.headers
        rows = {r["operation_type"]: r for r in (await client.get(f"{P}/operations", headers=AUTH)).json()}
        assert rows["example.always_fails"]["blocked"] is True and rows["example.always_fails"]["failures"] == 5
        # When: unblocked, Then: it runs (and fails) again
        await client.post(f"{P}/operations/example.always_fails/unblock", headers=AUTH)
        assert (await client.get("/fail")).status_code == 500


async def test_drain_closes_the_gate_until_resume(serve: Client) -> None:
    async with serve() as client:
        job = await client.post("/jobs/slow", params={"seconds": 0.2})
        assert job.status_code == 202
        # When: drained
        report = (await client.post(f"{P}/drain", params={"timeout": 10}, headers=AUTH)).json()
        assert report["drained"] is True and report["remaining"] == 0
        # Then: not ready, and new calls are refused with 503 gate_closed
        not_ready = await client.get(f"{P}/ready")
        assert not_ready.status_code == 503 and not_ready.json()["status"] == "draining"
        refused = await client.get("/light")
        assert refused.status_code == 503 and refused.json()["error"] == "gate_closed"
        # When: resumed, Then: ready (once the worker processes, started with the server, are up) and serving
        assert (await client.post(f"{P}/resume", headers=AUTH)).status_code == 200
        await _wait_ready(client)
        assert (await client.get("/light")).status_code == 200
        history = (await client.get(f"{P}/history", params={"limit": 5}, headers=AUTH)).json()
    assert any(r["token_id"] == job.json()["token_id"] and r["state"] == "completed" for r in history)


async def test_a_paused_job_can_be_inspected_and_killed(serve: Client) -> None:
    async with serve() as client:
        assert (await client.get("/slow", params={"seconds": 0})).json()["state"] == "completed"
        await client.post(f"{P}/operations/example.slow/pause", headers=AUTH)
        job = (await client.post("/jobs/slow", params={"seconds": 1})).json()
        assert job["state"] == "waiting"
        status = (await client.get(f"{P}/tokens/{job['token_id']}", headers=AUTH)).json()
        assert status["state"] == "waiting" and status["settled"] is False
        killed = (await client.post(f"{P}/tokens/{job['token_id']}/kill", headers=AUTH)).json()
        assert killed["killed"] is True and killed["state"] == "killed"
        await client.post(f"{P}/operations/example.slow/resume", headers=AUTH)
        assert (await client.get(f"{P}/stats")).status_code == 401  # and the admin API needs the token


def test_admin_token_comes_from_the_environment_or_is_generated() -> None:
    assert admin_token({"TOKENGATE_ADMIN_TOKEN": " chosen-token "}) == ("chosen-token", False)
    generated, was_generated = admin_token({})
    assert was_generated is True and len(generated) >= 32
    assert admin_token({}) != (generated, True)  # a new one each run
    text = banner("http://127.0.0.1:8000", generated, True, "/tmp/q.sqlite3")
    assert f"admin token:   {generated}" in text and f"export TOKENGATE_ADMIN_TOKEN={generated}" in text


async def test_malformed_input_is_a_typed_422_and_the_app_keeps_working(serve: Client) -> None:
    async with serve() as client:
        # Given: bodies and parameters the endpoints refuse, including numbers JSON cannot encode back
        json_header = {"content-type": "application/json"}
        answers = [
            await client.post("/process", content=b'{"items": [NaN]}', headers=json_header),
            await client.post("/process", content=b'{"items": 1e999}', headers=json_header),
            await client.post("/process", content=b"{bad", headers=json_header),
            await client.get("/light", params={"n": -1}),
            await client.get("/slow", params={"seconds": "inf"}),
        ]
        # Then: each is a 422 with the body shape of every other error, never a 500
        for response in answers:
            assert response.status_code == 422, response.request.url
            body = response.json()
            assert body["error"] == "invalid_argument" and body["detail"].startswith("invalid request"), body
            assert isinstance(body["errors"], list) and body["errors"], body
        # and the app still answers
        assert (await client.post("/process", json={"items": [3, 1, 2]})).json()["result"]["median"] == 2


async def test_unknown_paths_and_methods_answer_in_the_common_error_body(serve: Client) -> None:
    async with serve() as client:
        # Given a path nobody serves, When it is asked for, Then 404 not_found says which path
        missing = await client.get("/no/such/page")
        assert missing.status_code == 404
        assert missing.json() == {"error": "not_found", "detail": "no route serves /no/such/page"}
        # Given an app route asked with a method it does not serve, Then 405 with Allow
        wrong = await client.delete("/process")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert wrong.json() == {"error": "method_not_allowed",
                                "detail": "DELETE is not allowed on /process; use POST"}
        # and an unknown admin path is the same 404 shape
        admin_missing = await client.get(f"{P}/nope", headers=AUTH)
        assert admin_missing.status_code == 404 and admin_missing.json()["error"] == "not_found"
        # and without a token an admin path is refused: a slashed operation path 401, an unknown one 404
        anonymous = await client.post(f"{P}/operations/x/y/pause")
        assert (anonymous.status_code, anonymous.json()["error"]) == (401, "unauthorized")
        unknown = await client.get(f"{P}/nope")
        assert unknown.json() == {"error": "not_found", "detail": f"no route serves {P}/nope"}
        assert (await stats(client))["paused_operations"] == []


@pytest.mark.parametrize("argv", [["--timeout-graceful-shutdown", "3"],  # shorter than the default 10 s drain
                                  ["--drain-timeout", "5", "--timeout-graceful-shutdown", "4"],
                                  ["--drain-timeout", "-1"], ["--drain-timeout", "nan"]])
def test_main_refuses_a_graceful_timeout_shorter_than_the_drain_and_bad_drains(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from example_app.__main__ import main

    # When the shutdown options could cut off accepted requests (or make no sense), Then nothing starts
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "--drain-timeout" in capsys.readouterr().err



async def _wait_ready(client: httpx.AsyncClient) -> None:
    # The worker processes start with the server, off the request path: poll (bounded) until they are up.
    for _ in range(600):
        ready = await client.get(f"{P}/ready")
        if ready.status_code == 200:
            assert ready.json()["processes_ready"] == ready.json()["processes"] == PROCESS_WORKERS
            return
        assert ready.json()["status"] == "starting"
        await asyncio.sleep(0.05)
    raise AssertionError("the example app's worker processes did not come up")


async def test_cpu_runs_in_a_worker_process_on_the_process_lane(serve: Client) -> None:
    async with serve() as client:
        await _wait_ready(client)
        # When: /cpu is called
        answer = (await client.get("/cpu", params={"n": 1000})).json()
        # Then: the right result, computed in one of the worker processes the admin API lists
        assert answer["checksum"] == crunch.__wrapped__(1000)["checksum"] and answer["n"] == 1000
        assert answer["state"] == "completed" and answer["worker_id"].startswith(f"core{answer['core_id']}-p")
        workers = (await client.get(f"{P}/workers", headers=AUTH)).json()
        pids = {w["process"]["pid"] for w in workers if w["lane"] == "process"}
        assert len(pids) == PROCESS_WORKERS and answer["pid"] in pids and answer["pid"] != os.getpid()
        # n is bounded: past CPU_MAX_N it is a 422, not minutes of CPU
        too_big = await client.get("/cpu", params={"n": CPU_MAX_N + 1})
        assert too_big.status_code == 422 and too_big.json()["error"] == "invalid_argument"


async def test_a_crash_is_contained_to_its_request(serve: Client) -> None:
    async with serve() as client:
        await _wait_ready(client)
        # When: the function kills its worker process
        crashed = await client.get("/crash")
        # Then: that request gets the documented 502, and the next requests are served
        assert crashed.status_code == 502, crashed.text
        assert crashed.json()["error"] == "worker_crashed" and crashed.json()["exitcode"] == 3
        assert [(await client.get("/cpu", params={"n": 100})).status_code for _ in range(8)] == [200] * 8
        assert (await client.get("/light", params={"n": 10})).status_code == 200
        workers = (await client.get(f"{P}/workers", headers=AUTH)).json()
        assert sum(w["process"]["crashes"] for w in workers if w["lane"] == "process") == 1
        rows = {r["operation_type"]: r for r in (await client.get(f"{P}/operations", headers=AUTH)).json()}
        assert rows["example.crash"]["lane"] == "process" and rows["example.crash"]["failures"] == 1
        assert rows["example.light_cpu"]["lane"] == "thread"
        # and after 5 crashes in a row the reputation policy blocks the operation
        for _ in range(4):
            assert (await client.get("/crash")).status_code == 502
        blocked = await client.get("/crash")
        assert blocked.status_code == 503 and blocked.json()["error"] == "operation_blocked"
        assert (await client.get("/cpu", params={"n": 100})).status_code == 200
