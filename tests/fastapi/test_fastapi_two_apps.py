"""Two apps with two coordinators in one process do not interfere (no hidden globals)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from fastapi import FastAPI

from tokengate import OperationsCoordinator, task_token_guard
from tokengate_fastapi import CoordinatorDep, admin_router, tokengate_lifespan

pytestmark = pytest.mark.anyio

P = "/tokengate"


@task_token_guard(operation_type="two.square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


async def test_two_apps_two_coordinators(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                         auth: dict[str, str]) -> None:
    # Given: two apps, each with its own lifespan, coordinator and admin router
    app_a, app_b = make_app(name="tgtest-a"), make_app(name="tgtest-b")
    async with serve(app_a) as a, serve(app_b) as b:
        coord_a: OperationsCoordinator = app_a.state.tokengate
        coord_b: OperationsCoordinator = app_b.state.tokengate
        assert coord_a is not coord_b
        # When: work runs on A only, and B is drained and paused
        assert await coord_a.submit(square, (3,), {}) == 9
        await b.post(f"{P}/drain", json={"wait": False}, headers=auth)
        await b.post(f"{P}/operations/two.square/pause", headers=auth)
        # Then: each router reports its own coordinator
        stats_a = (await a.get(f"{P}/stats", headers=auth)).json()
        stats_b = (await b.get(f"{P}/stats", headers=auth)).json()
        assert (stats_a["name"], stats_a["counts"]["completed"], stats_a["draining"]) == ("tgtest-a", 1, False)
        assert (stats_b["name"], stats_b["counts"]["completed"], stats_b["draining"]) == ("tgtest-b", 0, True)
        assert stats_a["paused_operations"] == [] and stats_b["paused_operations"] == ["two.square"]
        assert (await a.get(f"{P}/ready")).status_code == 200
        assert (await b.get(f"{P}/ready")).status_code == 503
        metrics_a = (await a.get(f"{P}/metrics", headers=auth)).text
        metrics_b = (await b.get(f"{P}/metrics", headers=auth)).text
        assert 'coordinator="tgtest-a"' in metrics_a and 'coordinator="tgtest-b"' not in metrics_a
        assert 'tokengate_draining{coordinator="tgtest-b"} 1.0' in metrics_b
        await b.post(f"{P}/resume", headers=auth)


async def test_one_router_object_serves_two_apps(serve: Callable[..., Any], auth: dict[str, str]) -> None:
    # Given: the same router included in two apps (it reads the coordinator from each request)
    router = admin_router(token=auth["Authorization"].split()[1])
    apps = []
    for name in ("tgtest-x", "tgtest-y"):
        app = FastAPI(lifespan=tokengate_lifespan(num_cores=1, workers_per_core=1, policies=[], name=name))
        app.include_router(router, prefix=P)

        @app.get("/whoami")
        async def whoami(coordinator: CoordinatorDep) -> str:
            return coordinator.name

        apps.append(app)
    async with serve(apps[0]) as x, serve(apps[1]) as y:
        # Then: each app's admin routes and metrics see that app's coordinator
        assert (await x.get(f"{P}/stats", headers=auth)).json()["name"] == "tgtest-x"
        assert (await y.get(f"{P}/stats", headers=auth)).json()["name"] == "tgtest-y"
        assert 'coordinator="tgtest-y"' in (await y.get(f"{P}/metrics", headers=auth)).text
        assert 'coordinator="tgtest-x"' in (await x.get(f"{P}/metrics", headers=auth)).text
        assert (await y.get("/whoami")).json() == "tgtest-y"
