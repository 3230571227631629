"""Every error mapping of add_exception_handlers: status, headers, body; plus real refusals end to end."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Callable

import httpx
import pytest
from fastapi import FastAPI, HTTPException
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    CoordinatorStopped,
    GateClosed,
    OperationBlocked,
    Overloaded,
    Rejected,
    TokenKilled,
    TokenQuarantined,
    TokenTimeout,
    task_token_guard,
)
from tokengate.errors import (
    LaneClosed,
    NestedCallRefused,
    PicklingFailed,
    ProcessLaneError,
    RemoteError,
    WorkerCrashed,
    WorkerStartFailed,
    WorkerTerminated,
)
from tokengate.fingerprint import StickyKeyError
from tokengate_fastapi import ErrorCode, add_exception_handlers, error_response, tokengate_lifespan
from tokengate_fastapi.errors import http_exception_handler, retry_after_header

pytestmark = pytest.mark.anyio

OPTIONS: dict[str, Any] = {"num_cores": 1, "workers_per_core": 1, "policies": [], "name": "tgtest-errors"}

# (exception, status, error code, Retry-After or None, fields the body must have)
CASES: list[tuple[Exception, int, str, str | None, dict[str, Any]]] = [
    (Overloaded("light class is full", operation_type="op", weight="light", pending=5, limit=5, retry_after=2.5),
     503, "overloaded", "3", {"operation_type": "op", "retry_after": 2.5}),
    (GateClosed("draining", operation_type="op"), 503, "gate_closed", "5", {"operation_type": "op"}),
    (OperationBlocked("blocked", operation_type="op", retry_after=0.2), 503, "operation_blocked", "1",
     {"operation_type": "op", "retry_after": 0.2}),
    (Rejected("a policy said no", operation_type="op", reason="custom"), 503, "rejected", "1",
     {"operation_type": "op", "reason": "custom"}),
    (TokenQuarantined("held for review", operation_type="op", quarantine_id="q-42", trigger="spike"), 409,
     "token_quarantined", None, {"quarantine_id": "q-42", "operation_type": "op", "trigger": "spike"}),
    (TokenTimeout("too slow", token_id="7", timeout=0.5, started=True), 504, "token_timeout", None,
     {"token_id": "7", "timeout": 0.5, "started": True}),
    (TokenKilled("killed", token_id="8", reason="killed by operator"), 409, "token_killed", None,
     {"token_id": "8", "reason": "killed by operator"}),
    (CoordinatorStopped("stopped", token_id="9", reason="coordinator stopped"), 503, "coordinator_stopped", "5",
     {"token_id": "9"}),
    (CoordinatorNotRunning("not running"), 503, "coordinator_not_running", "5", {}),
    # the process lane
    (WorkerCrashed("worker process 41 died", pid=41, exitcode=-9, signal_name="SIGKILL"), 502, "worker_crashed",
     None, {"pid": 41, "exitcode": -9, "signal_name": "SIGKILL"}),
    (WorkerTerminated("ended", pid=42, reason="stopping"), 502, "worker_terminated", None,
     {"pid": 42, "reason": "stopping"}),
    (WorkerStartFailed("could not start"), 503, "worker_start_failed", "1", {}),
    (LaneClosed("closed"), 503, "lane_closed", "5", {}),
    (PicklingFailed("result did not pickle", direction="result", type_name="PicklingError", detail="x"), 500,
     "pickling_failed", None, {"direction": "result", "type_name": "PicklingError"}),
    (RemoteError("app.f raised Weird: no", type_name="app.Weird", remote_message="no", traceback="secret frames"),
     500, "remote_error", None, {"type_name": "app.Weird"}),
    (NestedCallRefused("no coordinator in a worker process"), 500, "nested_call_refused", None, {}),
    (ProcessLaneError("something else"), 500, "process_lane_error", None, {}),
    # a refusal that is the server's own configuration: never retried
    (StickyKeyError("sticky_key function raised", operation_type="pay"), 500, "call_misconfigured", None,
     {"operation_type": "pay"}),
]


def _raising_app(exc: BaseException) -> FastAPI:
    app = FastAPI()
    add_exception_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize("exc, status, code, retry_after, fields", CASES, ids=[c[2] for c in CASES])
async def test_each_error_maps_to_status_headers_and_body(
    exc: Exception, status: int, code: str, retry_after: str | None, fields: dict[str, Any]
) -> None:
    # Given: an endpoint raising the exception, with the handlers installed
    app = _raising_app(exc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        # When: it is called
        response = await client.get("/boom")
    # Then: status, Retry-After and body follow the table
    assert response.status_code == status
    assert response.headers.get("retry-after") == retry_after
    body = response.json()
    assert body["error"] == code == ErrorCode(code).value
    assert body["detail"] == str(exc)
    for key, value in fields.items():
        assert body[key] == value
    assert "secret frames" not in response.text  # a remote traceback never reaches a client


async def test_unmapped_tokengate_errors_stay_500() -> None:
    # Given: a tokengate error with no HTTP meaning (a programming error)
    app = _raising_app(ConfigurationError("bad option"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
    # Then: it is not disguised as a refusal
    assert response.status_code == 500
    assert error_response(ConfigurationError("x")) is None


async def test_http_errors_answer_in_the_common_body_keeping_an_endpoints_own_detail() -> None:
    # Given an app with http_exception_handler and endpoints raising HTTP errors of their own
    app = FastAPI()
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)

    @app.get("/job/{job_id}")
    async def job(job_id: str) -> None:
        raise HTTPException(404, detail=f"no job {job_id}")

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(418, detail="short and stout", headers={"X-Why": "tea"})

    @app.get("/unchanged")
    async def unchanged() -> None:
        raise HTTPException(304)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        # Then the router's own 404 and 405 say what was asked
        assert (await client.get("/nowhere")).json() == {"error": "not_found", "detail": "no route serves /nowhere"}
        wrong = await client.post("/teapot")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"
        assert wrong.json() == {"error": "method_not_allowed", "detail": "POST is not allowed on /teapot; use GET"}
        # an endpoint's own detail and headers are kept; other statuses are http_error
        assert (await client.get("/job/7")).json() == {"error": "not_found", "detail": "no job 7"}
        tea = await client.get("/teapot")
        assert (tea.status_code, tea.headers["x-why"], tea.json()) == (
            418, "tea", {"error": "http_error", "detail": "short and stout"})
        # and a status that allows no body gets none
        bare = await client.get("/unchanged")
        assert (bare.status_code, bare.content) == (304, b"")


async def test_http_errors_keep_structured_details_and_an_endpoints_bare_404() -> None:
    # Given endpoints raising HTTP errors with a dict or list detail, a bare 404 and a bodiless status
    app = FastAPI()
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)

    @app.get("/form")
    async def form() -> None:
        raise HTTPException(400, detail={"field": "name", "problems": ["too short", "café"]})

    @app.get("/clash")
    async def clash() -> None:
        raise HTTPException(409, detail=["a", "b"])

    @app.get("/item/{item_id}")
    async def item(item_id: str) -> None:
        raise HTTPException(404)  # the route exists: the endpoint found no such item

    @app.get("/reset")
    async def reset() -> None:
        raise HTTPException(205, headers={"X-Kept": "yes"})

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        # Then a structured detail stays recoverable as JSON text (never a Python repr)
        form_body = (await client.get("/form")).json()
        assert form_body["error"] == "http_error"
        assert json.loads(form_body["detail"]) == {"field": "name", "problems": ["too short", "café"]}
        assert json.loads((await client.get("/clash")).json()["detail"]) == ["a", "b"]
        # an endpoint's own bare 404 is not called a missing route
        missing_item = await client.get("/item/7")
        assert missing_item.json() == {"error": "not_found", "detail": "Not Found"}
        # and 205 Reset Content carries no body either, but keeps its headers
        reset_answer = await client.get("/reset")
        assert (reset_answer.status_code, reset_answer.content, reset_answer.headers["x-kept"]) == (205, b"", "yes")


@pytest.mark.parametrize("seconds, header", [
    (None, "1"), (0, "1"), (-3, "1"), (0.01, "1"), (1, "1"), (1.2, "2"), (30, "30"),
    (float("nan"), "1"), (float("inf"), "86400"), (1e9, "86400"),
])
def test_retry_after_is_whole_seconds_at_least_one(seconds: float | None, header: str) -> None:
    assert retry_after_header(seconds) == header


# -- real refusals through a running coordinator ----------------------------------------


@task_token_guard(operation_type="errors.blocked", tags={"weight": "light"})
def blocked(gate: threading.Event, started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    gate.wait(10)
    return "done"


@task_token_guard(operation_type="errors.slow", tags={"weight": "light", "timeout": 0.05})
def slow(gate: threading.Event) -> str:
    gate.wait(10)
    return "late"


def _work_app(**options: Any) -> FastAPI:
    app = FastAPI(lifespan=tokengate_lifespan(drain_timeout=1, **{**OPTIONS, **options}))
    add_exception_handlers(app)
    app.state.gate = threading.Event()

    @app.post("/blocked")
    async def run_blocked() -> dict[str, str]:
        return {"result": await blocked(app.state.gate)}

    @app.post("/slow")
    async def run_slow() -> dict[str, str]:
        return {"result": await slow(app.state.gate)}

    return app


async def test_draining_app_answers_503_gate_closed(serve: Callable[..., Any]) -> None:
    # Given: a drained coordinator
    app = _work_app()
    async with serve(app) as client:
        await app.state.tokengate.drain(1)
        # When: a call is made
        response = await client.post("/blocked")
        # Then: it is refused with 503 and a retry hint
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"] == "gate_closed"
        assert response.json()["operation_type"] == "errors.blocked"


async def test_full_class_answers_503_overloaded(serve: Callable[..., Any], gate: threading.Event) -> None:
    # Given: one worker busy, its one-slot mailbox full, and no pending room
    app = _work_app(mailbox_size=1, max_pending=0)
    app.state.gate = gate
    async with serve(app) as client:
        started = threading.Event()
        running = blocked(gate, started)
        assert await asyncio.to_thread(started.wait, 10)
        queued = blocked(gate)
        # When: one more call comes
        response = await client.post("/blocked")
        # Then: 503 overloaded with Retry-After
        assert response.status_code == 503
        assert response.json()["error"] == "overloaded"
        assert int(response.headers["retry-after"]) >= 1
        gate.set()
        assert await running == await queued == "done"


async def test_timed_out_call_answers_504(serve: Callable[..., Any], gate: threading.Event) -> None:
    # Given: a call whose timeout tag (0.05 s) passes while it blocks
    app = _work_app()
    app.state.gate = gate
    async with serve(app) as client:
        # When: it is awaited by an endpoint
        response = await client.post("/slow")
        gate.set()
    # Then: 504 with the token id
    assert response.status_code == 504
    body = response.json()
    assert body["error"] == "token_timeout" and body["token_id"] and body["timeout"] == 0.05


async def test_killed_call_answers_409(serve: Callable[..., Any], gate: threading.Event) -> None:
    # Given: the only worker busy, so the endpoint's call waits in the mailbox
    app = _work_app()
    app.state.gate = gate
    async with serve(app) as client:
        started = threading.Event()
        running = blocked(gate, started)
        assert await asyncio.to_thread(started.wait, 10)
        request = asyncio.ensure_future(client.post("/blocked"))
        coordinator = app.state.tokengate
        for _ in range(10_000):  # bounded: until the endpoint's token is queued
            if coordinator.inflight == 2:
                break
            await asyncio.sleep(0)
        assert coordinator.inflight == 2
        # When: an operator kills the queued call
        assert coordinator.kill_operation("errors.blocked") == 1
        response = await request
        gate.set()
        assert await running == "done"
    # Then: its awaiter's request answers 409 token_killed
    assert response.status_code == 409
    assert response.json()["error"] == "token_killed"
    assert response.json()["reason"] == "killed by operator"


async def test_405_allow_lists_every_method_served_on_the_path(make_app: Callable[..., FastAPI],
                                                               serve: Callable[..., Any]) -> None:
    # Given an app whose own path is served by two routes, and the admin router (GET and DELETE /quarantine/{id})
    app = make_app()
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)

    @app.get("/item/{item_id}")
    async def get_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    @app.delete("/item/{item_id}")
    async def delete_item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    async with serve(app) as client:
        # When a method neither route serves is used, Then Allow names both routes' methods
        for method, path, allow in [("PUT", "/item/1", "DELETE, GET"),
                                    ("OPTIONS", "/tokengate/quarantine/q1", "DELETE, GET"),
                                    ("PATCH", "/tokengate/quarantine/q1", "DELETE, GET"),
                                    ("GET", "/tokengate/drain", "POST")]:
            answer = await client.request(method, path)
            assert answer.status_code == 405, (method, path)
            assert answer.headers["allow"] == allow, (method, path)
            assert answer.json()["error"] == "method_not_allowed"
            assert answer.json()["detail"].endswith(f"use {allow}")
