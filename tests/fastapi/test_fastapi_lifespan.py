"""tokengate_lifespan alone and nested, restarts, shutdown with work in flight; the coordinator dependency."""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI, Request

from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    CoordinatorStopped,
    OperationsCoordinator,
    TokenState,
    task_token_guard,
)
from tokengate_fastapi import CoordinatorDep, add_exception_handlers, get_coordinator, tokengate_lifespan

pytestmark = pytest.mark.anyio

OPTIONS: dict[str, Any] = {"num_cores": 1, "workers_per_core": 1, "policies": [], "name": "tgtest-life"}


@task_token_guard(operation_type="life.blocked", tags={"weight": "light"})
def blocked(gate: threading.Event, started: threading.Event | None = None) -> str:
    if started is not None:
        started.set()
    gate.wait(10)
    return "done"


def _pool_app(app: FastAPI) -> FastAPI:
    @app.get("/pool")
    async def pool(coordinator: CoordinatorDep) -> dict[str, Any]:
        return {"id": id(coordinator), "running": coordinator.running, "mode": coordinator.stats()["mode"],
                "same_loop": coordinator.loop is asyncio.get_running_loop()}

    return app


async def test_lifespan_alone_starts_on_the_server_loop_and_stops(serve: Callable[..., Any]) -> None:
    # Given: an app whose whole lifespan is tokengate's
    app = _pool_app(FastAPI(lifespan=tokengate_lifespan(**OPTIONS)))
    # When: it runs and serves a request
    async with serve(app) as client:
        coordinator = app.state.tokengate
        body = (await client.get("/pool")).json()
        # Then: the endpoint got the running coordinator, attached to the server's loop
        assert body == {"id": id(coordinator), "running": True, "mode": "attached", "same_loop": True}
    # and shutdown stopped it and cleaned app.state
    assert not coordinator.running
    assert coordinator.stats()["phase"] == "stopped"
    assert not hasattr(app.state, "tokengate")


async def test_lifespan_nested_inside_a_user_lifespan(serve: Callable[..., Any]) -> None:
    # Given: a user lifespan that owns another resource and nests tokengate's
    tokengate = tokengate_lifespan(**OPTIONS)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        events.append("db open")
        async with tokengate(app) as state:
            yield {**state, "db": "connection"}
        events.append("db closed")

    app = _pool_app(FastAPI(lifespan=lifespan))

    @app.get("/db")
    async def db(request: Request) -> dict[str, Any]:
        return {"db": request.state.db, "tokengate": id(request.state.tokengate)}

    # When: it runs
    async with serve(app) as client:
        coordinator = app.state.tokengate
        body = (await client.get("/pool")).json()
        # Then: the coordinator is in the lifespan state the request sees, next to the user's state
        assert body["running"] is True and body["id"] == id(coordinator)
        assert (await client.get("/db")).json() == {"db": "connection", "tokengate": id(coordinator)}
    assert events == ["db open", "db closed"]
    assert not coordinator.running


async def test_each_startup_gets_a_fresh_coordinator(serve: Callable[..., Any]) -> None:
    # Given: one app started twice (e.g. by two test clients in a row)
    app = FastAPI(lifespan=tokengate_lifespan(**OPTIONS))
    async with serve(app):
        first = app.state.tokengate
    # When: it starts again
    async with serve(app):
        second = app.state.tokengate
        # Then: a new coordinator runs (a stopped one cannot restart)
        assert second is not first and second.running
    assert not first.running and not second.running


async def test_coordinator_factory_is_called_at_startup(serve: Callable[..., Any]) -> None:
    # Given: a factory instead of options
    made: list[OperationsCoordinator] = []

    def factory() -> OperationsCoordinator:
        made.append(OperationsCoordinator(**OPTIONS))
        return made[-1]

    app = FastAPI(lifespan=tokengate_lifespan(coordinator_factory=factory))
    # Then: nothing is built before the server starts
    assert made == []
    async with serve(app):
        assert app.state.tokengate is made[0] and made[0].running
    assert not made[0].running


async def test_shutdown_settles_work_still_in_flight(serve: Callable[..., Any], gate: threading.Event) -> None:
    # Given: one worker running a blocked call and a second call queued behind it
    app = FastAPI(lifespan=tokengate_lifespan(drain_timeout=0.05, **OPTIONS))
    started = threading.Event()
    async with serve(app):
        coordinator = app.state.tokengate
        running = blocked(gate, started)
        queued = blocked(gate)
        # free the worker as soon as the shutdown settles the running token (no 1 s stuck-worker wait)
        running.add_done_callback(lambda _: gate.set())
        assert await asyncio.to_thread(started.wait, 10)
    # When: the lifespan shut down (drain timed out after 0.05 s)
    # Then: it did not hang, and every token is settled for its awaiter
    assert queued.state is TokenState.KILLED and running.state is TokenState.KILLED
    with pytest.raises(CoordinatorStopped):
        await queued
    with pytest.raises(CoordinatorStopped):
        await running
    assert coordinator.inflight == 0


async def test_shutdown_lets_accepted_work_finish_within_drain_timeout(gate: threading.Event) -> None:
    # Given: a running app with a blocked call
    app = FastAPI(lifespan=tokengate_lifespan(drain_timeout=10, **OPTIONS))
    manager = LifespanManager(app, shutdown_timeout=15)
    await manager.__aenter__()
    coordinator = app.state.tokengate
    token = blocked(gate)
    # When: shutdown starts, and the call finishes while it drains
    shutdown = asyncio.ensure_future(manager.__aexit__(None, None, None))
    for _ in range(10_000):  # bounded: wait until the drain closed the gate
        if coordinator.draining:
            break
        await asyncio.sleep(0)
    assert coordinator.draining
    gate.set()
    await shutdown
    # Then: the call completed normally instead of being stopped
    assert await token == "done"
    assert token.state is TokenState.COMPLETED


async def test_dependency_without_lifespan_says_how_to_fix_it() -> None:
    # Given: an app that uses the dependency but forgot the lifespan
    app = FastAPI()
    add_exception_handlers(app)

    @app.get("/pool")
    async def pool(coordinator: CoordinatorDep) -> dict[str, bool]:
        return {"running": coordinator.running}

    # When: a request needs the coordinator
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/pool")
    # Then: the error names the fix
    assert response.status_code == 503
    body = response.json()
    assert body["error"] == "coordinator_not_running"
    assert "did you pass lifespan=tokengate_lifespan() to FastAPI()?" in body["detail"]


async def test_dependency_raises_a_clear_error_without_handlers() -> None:
    # Given: no lifespan and no handlers
    app = FastAPI()
    request_scope: dict[str, Any] = {"type": "http", "app": app, "state": {}, "headers": []}

    # When / Then: the dependency raises CoordinatorNotRunning with the hint
    with pytest.raises(CoordinatorNotRunning, match="tokengate_lifespan"):
        await get_coordinator(Request(request_scope))


async def test_dependency_can_be_overridden(serve: Callable[..., Any]) -> None:
    # Given: a test replacing the coordinator through dependency_overrides
    app = _pool_app(FastAPI(lifespan=tokengate_lifespan(**OPTIONS)))
    async with OperationsCoordinator(**{**OPTIONS, "name": "tgtest-other"}) as other:
        async def override() -> OperationsCoordinator:
            return other

        app.dependency_overrides[get_coordinator] = override
        async with serve(app) as client:
            # Then: endpoints get the override
            assert (await client.get("/pool")).json()["id"] == id(other)


@pytest.mark.parametrize("kwargs, match", [
    ({"drain_timeout": -1}, "drain_timeout"),
    ({"drain_timeout": float("nan")}, "drain_timeout"),
    ({"drain_timeout": True}, "drain_timeout"),
    ({"num_cores": 0}, "num_cores"),
    ({"num_corez": 2}, "num_corez"),
    ({"coordinator_factory": OperationsCoordinator, "num_cores": 1}, "not both"),
    ({"coordinator_factory": "not callable"}, "callable"),
])
def test_bad_options_fail_when_the_lifespan_is_built(kwargs: dict[str, Any], match: str) -> None:
    # When / Then: configuration errors surface at construction (import time), not at startup
    with pytest.raises(ConfigurationError, match=match):
        tokengate_lifespan(**kwargs)


async def test_factory_returning_something_else_fails_startup() -> None:
    # Given: a factory that returns the wrong type
    factory: Any = lambda: "nope"  # noqa: E731
    app = FastAPI(lifespan=tokengate_lifespan(coordinator_factory=factory))
    # When / Then: startup fails with a message naming the factory
    with pytest.raises(ConfigurationError, match="coordinator_factory must return"):
        async with LifespanManager(app):
            pass
