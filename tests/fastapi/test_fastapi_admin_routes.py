"""Every admin route with a valid token: answers, unknown ids (404), malformed input (422), conflicts (409)."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Callable

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST

from tokengate import Policy, TokenState, task_token_guard

pytestmark = pytest.mark.anyio

P = "/tokengate"


@task_token_guard(operation_type="admin.square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="admin.blocked", tags={"weight": "light"})
def blocked(gate: threading.Event, started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    gate.wait(10)
    return "done"


async def _busy_worker(gate: threading.Event) -> Any:
    """Occupy the single worker; return its running token once it started."""
    started = threading.Event()
    running = blocked(gate, started)
    assert await asyncio.to_thread(started.wait, 10)
    return running


@pytest.fixture
def app(make_app: Callable[..., FastAPI]) -> FastAPI:
    return make_app(workers_per_core=1)


async def test_stats_affinity_workers_history(app: FastAPI, serve: Callable[..., Any],
                                              auth: dict[str, str]) -> None:
    async with serve(app) as client:
        # Given: three completed calls
        assert list(await asyncio.gather(square(1), square(2), square(3))) == [1, 4, 9]
        # When / Then: /stats is the coordinator's snapshot plus pid
        stats = (await client.get(f"{P}/stats", headers=auth)).json()
        assert stats["pid"] == os.getpid()
        assert stats["name"] == "tgtest" and stats["phase"] == "running"
        assert stats["counts"]["completed"] == 3
        assert stats["routed_by_weight"]["light"] == 3
        assert stats["cores"][0]["workers"][0]["worker_id"]
        # /affinity: routed counts per core and weight, live queue depth per worker
        affinity = (await client.get(f"{P}/affinity", headers=auth)).json()
        assert affinity["pid"] == os.getpid()
        core = affinity["cores"][0]
        assert core["core_id"] == 1 and core["routed"]["light"] == 3 and core["routed_total"] == 3
        assert set(core["workers"][0]) == {"worker_id", "queue_depth", "busy", "active"}
        # /workers: one row per worker thread, with its core
        workers = (await client.get(f"{P}/workers", headers=auth)).json()
        assert len(workers) == 1 and workers[0]["core_id"] == 1 and workers[0]["executed"] == 3
        # /history: newest first, limited
        history = (await client.get(f"{P}/history", params={"limit": 2}, headers=auth)).json()
        assert [r["state"] for r in history] == ["completed", "completed"]
        assert history[0]["operation_type"] == "admin.square"
        assert int(history[0]["token_id"]) > int(history[1]["token_id"])
        assert len((await client.get(f"{P}/history", headers=auth)).json()) == 3


async def test_history_limit_out_of_range_is_422(app: FastAPI, serve: Callable[..., Any],
                                                 auth: dict[str, str]) -> None:
    async with serve(app) as client:
        for limit in ("0", "1001", "-1", "ten"):
            response = await client.get(f"{P}/history", params={"limit": limit}, headers=auth)
            assert response.status_code == 422, limit
            body = response.json()
            assert body["error"] == "invalid_argument" and body["detail"].startswith("invalid request: query.limit")
            assert body["errors"][0]["loc"] == ["query", "limit"]
        assert (await client.get(f"{P}/history", params={"limit": 1000}, headers=auth)).status_code == 200


async def test_token_status_live_settled_unknown_malformed(app: FastAPI, serve: Callable[..., Any],
                                                           auth: dict[str, str], gate: threading.Event) -> None:
    async with serve(app) as client:
        # Given: one running call and one settled call
        done = square(5)
        assert await done == 25
        running = await _busy_worker(gate)
        # When / Then: a live token shows its live status
        live = (await client.get(f"{P}/tokens/{running.token_id}", headers=auth)).json()
        assert live["state"] == "executing" and live["settled"] is False and live["started_at"] is not None
        # a settled one comes from the history
        settled = (await client.get(f"{P}/tokens/{done.token_id}", headers=auth)).json()
        assert settled["state"] == "completed" and settled["settled"] is True
        # unknown → 404, malformed → 422
        unknown = await client.get(f"{P}/tokens/999999999", headers=auth)
        assert unknown.status_code == 404 and unknown.json()["error"] == "token_not_found"
        assert (await client.get(f"{P}/tokens/abc", headers=auth)).status_code == 422
        gate.set()
        await running


async def test_kill_queued_executing_settled_unknown(app: FastAPI, serve: Callable[..., Any],
                                                     auth: dict[str, str], gate: threading.Event) -> None:
    async with serve(app) as client:
        # Given: a running call, a call queued behind it, and a settled call
        done = square(2)
        await done
        running = await _busy_worker(gate)
        queued = blocked(gate)
        # When: the queued one is killed → 200, it settles KILLED
        response = await client.post(f"{P}/tokens/{queued.token_id}/kill", headers=auth)
        assert response.status_code == 200
        assert response.json() == {"token_id": queued.token_id, "killed": True, "found": True, "state": "killed",
                                   "message": "killed before it started"}
        assert queued.state is TokenState.KILLED
        # the executing one → 409 saying why
        response = await client.post(f"{P}/tokens/{running.token_id}/kill", headers=auth)
        assert response.status_code == 409
        body = response.json()
        assert body["error"] == "token_executing" and "cannot be interrupted" in body["detail"]
        # a settled one → 409 already settled; an unknown one → 404; a malformed id → 422
        response = await client.post(f"{P}/tokens/{done.token_id}/kill", headers=auth)
        assert response.status_code == 409 and response.json()["error"] == "token_already_settled"
        assert response.json()["state"] == "completed"
        response = await client.post(f"{P}/tokens/424242424/kill", headers=auth)
        assert response.status_code == 404 and response.json()["error"] == "token_not_found"
        assert (await client.post(f"{P}/tokens/1x/kill", headers=auth)).status_code == 422
        gate.set()
        assert await running == "done"


async def test_drain_pause_resume_and_readiness(app: FastAPI, serve: Callable[..., Any],
                                                auth: dict[str, str]) -> None:
    async with serve(app) as client:
        assert (await client.get(f"{P}/ready")).json() == {"status": "ready", "ready": True, "pid": os.getpid(),
                                                           "processes": None, "processes_ready": None}
        # When: drain with the default options (wait, 30 s) on an idle pool
        report = (await client.post(f"{P}/drain", headers=auth)).json()
        # Then: it drained at once, and readiness says 503 with Retry-After
        assert report["drained"] is True and report["remaining"] == 0
        ready = await client.get(f"{P}/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert ready.json()["status"] == "draining" and ready.json()["ready"] is False
        # When: resumed
        state = (await client.post(f"{P}/resume", headers=auth)).json()
        assert state == {"pid": os.getpid(), "phase": "running", "paused": False, "draining": False,
                         "inflight": 0}
        assert (await client.get(f"{P}/ready")).status_code == 200
        # When: paused
        state = (await client.post(f"{P}/pause", headers=auth)).json()
        assert state["paused"] is True
        ready = await client.get(f"{P}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "paused"
        await client.post(f"{P}/resume", headers=auth)


async def test_drain_options_body_query_and_validation(app: FastAPI, serve: Callable[..., Any],
                                                       auth: dict[str, str], gate: threading.Event) -> None:
    async with serve(app) as client:
        running = await _busy_worker(gate)
        # Given: work in flight; When: drain without waiting (JSON body, as the dashboard sends it)
        report = (await client.post(f"{P}/drain", json={"wait": False}, headers=auth)).json()
        # Then: it answers at once with what is left
        assert report["drained"] is False and report["remaining"] == 1
        # query parameters work too (a short bounded wait that times out)
        report = (await client.post(f"{P}/drain", params={"timeout": 0.01}, headers=auth)).json()
        assert report["drained"] is False and report["remaining"] == 1
        # malformed options → 422
        for bad in ({"timeout": -1}, {"timeout": 301}, {"wait": "maybe"}):
            assert (await client.post(f"{P}/drain", json=bad, headers=auth)).status_code == 422
        assert (await client.post(f"{P}/drain", params={"timeout": "x"}, headers=auth)).status_code == 422
        gate.set()
        assert await running == "done"
        # When: waiting now → drained
        assert (await client.post(f"{P}/drain", json={"wait": True, "timeout": 5}, headers=auth)).json()["drained"]
        await client.post(f"{P}/resume", headers=auth)


async def test_health_and_metrics(app: FastAPI, serve: Callable[..., Any], auth: dict[str, str]) -> None:
    async with serve(app) as client:
        assert await square(4) == 16
        health = await client.get(f"{P}/health")
        assert health.status_code == 200 and health.json() == {"status": "ok", "pid": os.getpid()}
        metrics = await client.get(f"{P}/metrics", headers=auth)
        assert metrics.status_code == 200
        assert metrics.headers["content-type"] == CONTENT_TYPE_LATEST
        text = metrics.text
        assert 'tokengate_settled_total{coordinator="tgtest",state="completed"} 1.0' in text
        assert 'tokengate_routed_total{coordinator="tgtest",core="1",weight="light"} 1.0' in text
        assert 'tokengate_up{coordinator="tgtest"} 1.0' in text
        assert "token_id" not in text


#: The documented reputation fields of an /operations row, null when the policy has no data for the operation
#: (and its lane, null when no call of it is in the execution history).
NO_REPUTATION = {"health": None, "attempts": None, "successes": None, "failures": None, "completion_rate": None,
                 "run_time": None, "lane": None}


async def test_operations_without_policies(app: FastAPI, serve: Callable[..., Any], auth: dict[str, str],
                                           gate: threading.Event) -> None:
    async with serve(app) as client:
        # Given: no reputation policy → no rows
        assert (await client.get(f"{P}/operations", headers=auth)).json() == []
        # When: an operation is paused, Then: it gets a row so it can be seen and resumed
        state = (await client.post(f"{P}/operations/admin.square/pause", headers=auth)).json()
        assert state == {"operation_type": "admin.square", "paused": True, "held": False, "blocked": False}
        rows = (await client.get(f"{P}/operations", headers=auth)).json()
        assert rows == [{**NO_REPUTATION, "operation_type": "admin.square", "paused": True, "held": False,
                         "blocked": False}]
        waiting = square(6)  # held by the pause
        assert (await client.post(f"{P}/operations/admin.square/resume", headers=auth)).json()["paused"] is False
        assert await waiting == 36
        # unblock / hold / unhold need their policies
        for action in ("unblock", "hold", "unhold"):
            response = await client.post(f"{P}/operations/admin.square/{action}", headers=auth)
            assert response.status_code == 404 and response.json()["error"] == "policy_not_installed"
        # kill: every not-yet-started call of the operation
        running = await _busy_worker(gate)
        queued = [blocked(gate), blocked(gate)]
        body = (await client.post(f"{P}/operations/admin.blocked/kill", headers=auth)).json()
        assert body == {"operation_type": "admin.blocked", "killed": 2}
        assert all(t.state is TokenState.KILLED for t in queued)
        gate.set()
        assert await running == "done"



@task_token_guard(operation_type="admin/images/resize", tags={"weight": "light"})
def slashed(x: int) -> int:
    return -x


async def test_operation_types_with_slashes_are_addressable(app: FastAPI, serve: Callable[..., Any],
                                                            auth: dict[str, str]) -> None:
    async with serve(app) as client:
        # Given an operation type with "/" in it, written plainly or percent-encoded in the path
        for path in ("admin/images/resize", "admin%2Fimages%2Fresize"):
            # When it is paused, Then that operation (not a prefix of it) is paused
            state = (await client.post(f"{P}/operations/{path}/pause", headers=auth)).json()
            assert state == {"operation_type": "admin/images/resize", "paused": True, "held": False, "blocked": False}
            waiting = slashed(3)
            await asyncio.sleep(0.05)
            assert not waiting.done()
            # and resume releases its held call
            resumed = (await client.post(f"{P}/operations/{path}/resume", headers=auth)).json()
            assert resumed["paused"] is False
            assert await waiting == -3


async def test_slashed_operation_paths_shadow_no_other_route(app: FastAPI, serve: Callable[..., Any],
                                                             auth: dict[str, str]) -> None:
    async with serve(app) as client:
        # Given an operation type that itself ends in an action's name, Then the last segment is the action
        for action, paused in (("pause", True), ("resume", False)):
            state = (await client.post(f"{P}/operations/x/pause/{action}", headers=auth)).json()
            assert (state["operation_type"], state["paused"]) == ("x/pause", paused)
        # the listing and the quarantine routes are not swallowed by {operation_type:path}
        assert (await client.get(f"{P}/operations", headers=auth)).status_code == 200
        assert (await client.get(f"{P}/quarantine", headers=auth)).json() == []
        # another method on a slashed path is 405 (with Allow), a path without an action is 404
        wrong = await client.get(f"{P}/operations/a/b/pause", headers=auth)
        assert (wrong.status_code, wrong.headers["allow"], wrong.json()["error"]) == (405, "POST", "method_not_allowed")
        assert (await client.post(f"{P}/operations/a/b", headers=auth)).status_code == 404
        # a trailing slash is only redirected, never served
        assert (await client.post(f"{P}/operations/a/pause/", headers=auth)).status_code == 307
        # and the length bound counts the slashes: 300 characters pass, 301 and an empty type are 422
        longest = "a/" * 150
        assert (await client.post(f"{P}/operations/{longest}/kill", headers=auth)).json()["operation_type"] == longest
        for too_long_or_empty in ("a/" * 150 + "a", ""):
            bad = await client.post(f"{P}/operations/{too_long_or_empty}/kill", headers=auth)
            assert (bad.status_code, bad.json()["error"]) == (422, "invalid_argument")
        assert app.state.tokengate.stats()["paused_operations"] == []


async def test_operations_with_reputation_and_quarantine(make_app: Callable[..., FastAPI],
                                                         serve: Callable[..., Any], auth: dict[str, str],
                                                         fake_reputation: Any, fake_quarantine: Any) -> None:
    # Given: both policies installed, one operation with a reputation row, blocked
    app = make_app(policies=[fake_reputation, fake_quarantine])
    fake_reputation.rows["admin.square"] = {"operation_type": "admin.square", "attempts": 10, "health": "good"}
    fake_reputation.block("admin.square")
    async with serve(app) as client:
        rows = (await client.get(f"{P}/operations", headers=auth)).json()
        assert rows == [{**NO_REPUTATION, "operation_type": "admin.square", "attempts": 10, "health": "good",
                         "paused": False, "held": False, "blocked": True}]
        # When: unblocked, held, unheld
        assert (await client.post(f"{P}/operations/admin.square/unblock", headers=auth)).json()["blocked"] is False
        assert fake_reputation.blocked() == []
        assert (await client.post(f"{P}/operations/admin.square/hold", headers=auth)).json()["held"] is True
        assert fake_quarantine.held_operations() == ["admin.square"]
        assert (await client.post(f"{P}/operations/admin.square/unhold", headers=auth)).json()["held"] is False


async def test_quarantine_routes(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                 auth: dict[str, str], fake_quarantine: Any) -> None:
    app = make_app(policies=[fake_quarantine])
    for qid in ("q1", "q2", "q3"):
        fake_quarantine.add(qid)
    fake_quarantine.add("old", status="discarded")
    async with serve(app) as client:
        # list with filters and paging
        listed = (await client.get(f"{P}/quarantine", params={"status": "pending"}, headers=auth)).json()
        assert [r["id"] for r in listed] == ["q1", "q2", "q3"]
        page = (await client.get(f"{P}/quarantine", params={"limit": 1, "offset": 1}, headers=auth)).json()
        assert [r["id"] for r in page] == ["q2"]
        assert (await client.get(f"{P}/quarantine", params={"operation": "other"}, headers=auth)).json() == []
        for bad in ({"status": "weird"}, {"limit": 0}, {"limit": 1001}, {"offset": -1}):
            assert (await client.get(f"{P}/quarantine", params=bad, headers=auth)).status_code == 422
        # get one / unknown
        assert (await client.get(f"{P}/quarantine/q1", headers=auth)).json()["status"] == "pending"
        missing = await client.get(f"{P}/quarantine/nope", headers=auth)
        assert missing.status_code == 404 and missing.json()["error"] == "quarantine_not_found"
        # release: the updated record and the new token's id, without waiting for the outcome
        released = (await client.post(f"{P}/quarantine/q1/release", headers=auth)).json()
        assert released["record"]["status"] == "released"
        assert (await client.get(f"{P}/tokens/{released['token_id']}", headers=auth)).status_code == 200
        again = await client.post(f"{P}/quarantine/q1/release", headers=auth)
        assert again.status_code == 409 and again.json()["error"] == "quarantine_conflict"
        assert (await client.post(f"{P}/quarantine/nope/release", headers=auth)).status_code == 404
        # force=true reaches the policy (a take-over of another process's claim); the default is False
        forced = await client.post(f"{P}/quarantine/q3/release", params={"force": "true"}, headers=auth)
        assert forced.status_code == 200
        assert fake_quarantine.release_calls[0] == ("q1", False) and fake_quarantine.release_calls[-1] == ("q3", True)
        # discard
        assert (await client.delete(f"{P}/quarantine/q2", headers=auth)).json()["status"] == "discarded"
        assert (await client.delete(f"{P}/quarantine/q2", headers=auth)).status_code == 409
        assert (await client.delete(f"{P}/quarantine/nope", headers=auth)).status_code == 404


async def test_quarantine_without_the_policy(app: FastAPI, serve: Callable[..., Any], auth: dict[str, str]) -> None:
    async with serve(app) as client:
        assert (await client.get(f"{P}/quarantine", headers=auth)).json() == []
        for method, path in (("GET", "/quarantine/q1"), ("POST", "/quarantine/q1/release"),
                             ("DELETE", "/quarantine/q1")):
            response = await client.request(method, P + path, headers=auth)
            assert response.status_code == 404 and response.json()["error"] == "policy_not_installed"


async def test_incompatible_policy_is_named(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                            auth: dict[str, str]) -> None:
    # Given: a policy registered as "quarantine" without the admin API's methods
    class Impostor(Policy):
        name = "quarantine"

    app = make_app(policies=[Impostor()])
    async with serve(app) as client:
        response = await client.get(f"{P}/quarantine/q1", headers=auth)
    assert response.status_code == 500
    assert response.json()["error"] == "policy_incompatible" and "held_operations()" in response.json()["detail"]


async def test_route_names(app: FastAPI) -> None:
    # Every route is reachable by name in the "tokengate:" namespace (request.url_for)
    tid, op, qid = {"token_id": "7"}, {"operation_type": "op"}, {"quarantine_id": "q"}
    names: dict[str, dict[str, str]] = {
        "stats": {}, "affinity": {}, "workers": {}, "history": {}, "tokens.get": tid, "tokens.kill": tid,
        "operations.list": {}, "operations.pause": op, "operations.resume": op, "operations.unblock": op,
        "operations.hold": op, "operations.unhold": op, "operations.kill": op, "quarantine.list": {},
        "quarantine.get": qid, "quarantine.release": qid, "quarantine.discard": qid, "drain": {}, "pause": {},
        "resume": {}, "metrics": {}, "health": {}, "ready": {}, "events": {}, "dashboard": {},
    }
    for name, params in names.items():
        assert app.url_path_for(f"tokengate:{name}", **params).startswith("/tokengate/")
    assert app.url_path_for("tokengate:tokens.kill", token_id="7") == "/tokengate/tokens/7/kill"


async def test_dashboard_is_html_with_a_strict_csp(app: FastAPI, serve: Callable[..., Any]) -> None:
    async with serve(app) as client:
        # no token: the page holds no data
        response = await client.get(f"{P}/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "<html" in response.text.lower()
    assert response.headers.get("set-cookie") is None


async def test_coordinator_missing_answers_503(serve: Callable[..., Any], auth: dict[str, str]) -> None:
    # Given: the router mounted on an app without the lifespan
    from tokengate_fastapi import admin_router

    app = FastAPI()
    app.include_router(admin_router(token=auth["Authorization"].split()[1]), prefix=P)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get(f"{P}/stats", headers=auth)
        ready = await client.get(f"{P}/ready")
    # Then: the admin API's own error body, even without add_exception_handlers
    assert response.status_code == 503 and response.json()["error"] == "coordinator_not_running"
    assert "tokengate_lifespan" in response.json()["detail"]
    assert ready.status_code == 503


async def test_drain_non_finite_numbers_are_422_not_500(app: FastAPI, serve: Callable[..., Any],
                                                        auth: dict[str, str]) -> None:
    # Given: JSON bodies with numbers Python parses as inf / nan (httpx refuses to encode them: raw bytes)
    async with serve(app) as client:
        for raw in (b'{"timeout": 1e999}', b'{"timeout": NaN}', b'{"timeout": -Infinity}'):
            # When: they are sent as drain options
            response = await client.post(f"{P}/drain", content=raw, headers={**auth, "content-type": "application/json"})
            # Then: a typed 422 (the error list is still valid JSON), not a 500
            assert response.status_code == 422, raw
            assert response.json()["error"] == "invalid_argument", raw
        # and the pool was never drained, the API still answers
        assert (await client.get(f"{P}/ready")).status_code == 200
        assert (await client.get(f"{P}/stats", headers=auth)).status_code == 200


async def test_drain_query_options_survive_a_partial_body(app: FastAPI, serve: Callable[..., Any],
                                                          auth: dict[str, str], gate: threading.Event) -> None:
    async with serve(app) as client:
        running = await _busy_worker(gate)
        # Given: the timeout as a query parameter, `wait` in a body that does not mention the timeout
        drain = client.post(f"{P}/drain", params={"timeout": 0.01}, json={"wait": True}, headers=auth)
        # When: it drains (the bound only guards against the pre-fix hang: 30 s instead of 0.01 s)
        report = (await asyncio.wait_for(drain, 5)).json()
        # Then: the query's timeout applied (the blocked call is still running), the body's wait too
        assert report["drained"] is False and report["remaining"] == 1
        gate.set()
        assert await running == "done"
        await client.post(f"{P}/resume", headers=auth)


async def test_method_not_allowed_has_the_error_body(app: FastAPI, serve: Callable[..., Any],
                                                     auth: dict[str, str]) -> None:
    async with serve(app) as client:
        for method, path, allow in (("DELETE", "/stats", "GET"), ("GET", "/drain", "POST"),
                                    ("POST", "/health", "GET"), ("PUT", "/tokens/1/kill", "POST")):
            response = await client.request(method, P + path, headers=auth)
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == allow, (method, path)
            body = response.json()
            assert body["error"] == "method_not_allowed", (method, path)
            assert method in body["detail"] and allow in body["detail"], (method, path)
