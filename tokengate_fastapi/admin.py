"""``admin_router()``: the authenticated admin REST API of a tokengate coordinator.

Mount it under a prefix of your choice::

    app = FastAPI(lifespan=tokengate_lifespan())
    app.include_router(admin_router(), prefix="/tokengate")   # token from $TOKENGATE_ADMIN_TOKEN

Routes, relative to the prefix ([auth] = needs ``Authorization: Bearer <token>``):

* [auth] ``GET /stats`` · ``GET /affinity`` · ``GET /workers`` · ``GET /history?limit=`` ·
  ``GET /tokens/{id}`` · ``POST /tokens/{id}/kill``
* [auth] ``GET /history/series?after=``: time series of the last ``series_window`` seconds, sampled
  every ``series_interval`` seconds from the app's start (the dashboard's charts)
* [auth] ``GET /operations`` · ``POST /operations/{op}/pause|resume|unblock|hold|unhold|kill``
* [auth] ``GET /quarantine?status=&operation=&limit=&offset=`` · ``GET /quarantine/{id}`` ·
  ``POST /quarantine/{id}/release`` · ``DELETE /quarantine/{id}``
* [auth] ``POST /drain`` · ``POST /pause`` · ``POST /resume``
* [auth] ``GET /fleet``: the fleet's members and standing state (fleet mode)
* [auth] ``GET /cluster``: the Dask lane's cluster (connection, scheduler, workers and resources,
  calls in flight per class, the Dask dashboard link)
* ``GET /health`` and ``GET /ready``: open unless ``public_health=False``
* [auth] ``GET /metrics``: unless ``public_metrics=True``
* [auth] ``GET /events``: Server-Sent Events (one snapshot per tick shared by every stream; at most
  ``sse_max_streams`` open); also accepts ``?access_token=``
* ``GET /dashboard``: open on purpose (the page holds no data and asks for the token)

Errors use the body ``{"error": <ErrorCode>, "detail": ...}``: unknown ids 404,
malformed input 422, a method the route does not serve 405, a kill of a running
token 409 saying why. Credentials are checked before a request body is parsed.
Answers carry ``pid`` where it matters: with ``--workers N`` every process has
its own coordinator. Give them a fleet directory (``fleet_dir`` /
``TOKENGATE_FLEET_DIR``) and every read route answers for the whole fleet,
every control route acts on every process, and token ids become
``<member>-<number>`` (see :mod:`tokengate_fastapi.fleet`); each answer then
names its member in ``X-TokenGate-Member``.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends
from fastapi.params import Depends as DependsParam

from tokengate.errors import ConfigurationError

from .auth import AdminAuth
from .errors import AdminRoute
from .fleet import member_header
from ._routes_cluster import add_cluster_routes
from ._routes_fleet import add_fleet_routes
from ._routes_live import add_live_routes
from ._routes_operations import add_operation_routes
from ._routes_pool import add_pool_routes
from ._routes_series import add_series_routes
from ._series import DEFAULT_INTERVAL, DEFAULT_WINDOW, SeriesRecorders

__all__ = ["admin_router"]


def _check_seconds(name: str, value: object, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= high:
        raise ConfigurationError(f"{name} must be a number of seconds in (0, {high:g}], got {value!r}")
    return float(value)


def _check_count(name: str, value: object, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ConfigurationError(f"{name} must be a whole number in [1, {high:,}], got {value!r}")
    return value


def admin_router(
    *,
    token: str | None = None,
    allow_unauthenticated: bool = False,
    public_health: bool = True,
    public_metrics: bool = False,
    sse_interval: float = 1.0,
    sse_max_duration: float = 60.0,
    sse_max_streams: int = 100,
    include_in_schema: bool = True,
    name_prefix: str = "tokengate",
    series_interval: float = DEFAULT_INTERVAL,
    series_window: float = DEFAULT_WINDOW,
) -> APIRouter:
    """Build the admin API router; mount it with ``app.include_router(router, prefix=...)``.

    The router reads the coordinator from the request (see
    :func:`~tokengate_fastapi.get_coordinator`), so one router works with any
    app that runs :func:`~tokengate_fastapi.tokengate_lifespan`. Every handler
    is ``async def``: the admin API must answer even when every thread is busy.

    Args:
        token: The admin bearer token. Default: ``$TOKENGATE_ADMIN_TOKEN``,
            read now. With neither, protected routes answer 503 (fail closed).
        allow_unauthenticated: Development only: with no token configured,
            leave every route open (logged as a warning now). A configured
            token always wins.
        public_health: Leave ``/health`` and ``/ready`` open for probes (default True).
        public_metrics: Leave ``/metrics`` open for scrapers (default False).
        sse_interval: Seconds between ``/events`` snapshots (default 1).
        sse_max_duration: Seconds after which an ``/events`` stream ends and
            ``EventSource`` reconnects by itself (default 60). Bounds how long
            an open dashboard can hold a server's graceful shutdown.
        sse_max_streams: Most ``/events`` streams open at once on this router
            (default 100; at most 100,000). Every stream shares one snapshot
            per tick, but each still costs a socket and a wake-up per tick;
            past the cap ``/events`` answers 503 ``overloaded`` with
            ``Retry-After``. With ``--workers N`` each process has its own cap.
        include_in_schema: List the routes in the app's OpenAPI schema.
        name_prefix: Route names are ``f"{name_prefix}:stats"`` and so on, for
            ``request.url_for``.
        series_interval: Seconds between two samples of ``GET /history/series``
            (default 1; at least 0.05). The sampler is a task on the server's
            loop, started with the app by this router's lifespan (FastAPI's
            ``include_router`` merges it into the app's) and stopped at shutdown.
        series_window: Seconds of series kept in memory (default 300: five
            minutes); at most 20,000 points (``series_window / series_interval``).

    Raises:
        ConfigurationError: for an empty or whitespace-containing token, a bad
            interval, duration or stream cap, an empty *name_prefix*, or a bad
            series interval or window.
    """
    interval = _check_seconds("sse_interval", sse_interval, 3600)
    max_duration = _check_seconds("sse_max_duration", sse_max_duration, 86_400)
    max_streams = _check_count("sse_max_streams", sse_max_streams, 100_000)
    if not isinstance(name_prefix, str) or not name_prefix.strip():
        raise ConfigurationError(f"name_prefix must be a non-empty string, got {name_prefix!r}")
    series = SeriesRecorders(series_interval, series_window)
    auth = AdminAuth(token, allow_unauthenticated=allow_unauthenticated, where=f"{name_prefix} admin router")

    def name(suffix: str) -> str:
        return f"{name_prefix}:{suffix}"

    protected: list[DependsParam] = [Depends(auth.require)]
    # The lifespan starts the series sampler with the app, so a dashboard opened late sees the past.
    # Every answer names the fleet member (server process) that produced it (X-TokenGate-Member).
    router = APIRouter(route_class=AdminRoute, include_in_schema=include_in_schema, lifespan=series.lifespan,
                       dependencies=[Depends(member_header)])
    add_pool_routes(router, name=name, protected=protected)
    add_operation_routes(router, name=name, protected=protected)
    add_fleet_routes(router, name=name, protected=protected)
    add_cluster_routes(router, name=name, protected=protected)
    add_series_routes(router, name=name, protected=protected, recorders=series)
    add_live_routes(
        router,
        name=name,
        stream_protected=[Depends(auth.require_stream)],
        health_deps=[] if public_health else protected,
        metrics_deps=[] if public_metrics else protected,
        sse_interval=interval,
        sse_max_duration=max_duration,
        sse_max_streams=max_streams,
    )
    return router
