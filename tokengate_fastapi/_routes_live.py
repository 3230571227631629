"""Admin routes for probes and live views: /health, /ready, /metrics, /events (SSE), /dashboard.

Part of :func:`tokengate_fastapi.admin_router`.

``/events`` sends ``event: stats`` every ``sse_interval`` seconds; its
``data`` is one JSON object (see :func:`live_snapshot`)::

    {"stats": {...GET /stats...}, "history": [last 20 execution records, newest first],
     "operations": [GET /operations rows], "quarantine": [first 20 pending records]}

The stream ends when the client disconnects, when the coordinator stops,
after ``max_events`` events, or after ``sse_max_duration`` seconds; the first
event carries ``retry: 1000`` so ``EventSource`` reconnects by itself about a
second later. The bounded duration matters: uvicorn's graceful shutdown waits
for open responses (unless ``--timeout-graceful-shutdown`` is set), and an
endless stream would hold it until the browser goes away.
"""

import asyncio
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Sequence

from fastapi import APIRouter, Query, Response
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tokengate import OperationsCoordinator

from .dependencies import CoordinatorDep
from .errors import retry_after_header
from .metrics import TokengateCollector
from .schemas import Health, Ready, error_responses
from ._policies import find_quarantine, operation_rows
from ._routes_pool import stats_snapshot

__all__ = ["add_live_routes", "live_snapshot", "DASHBOARD_CSP"]

logger = logging.getLogger(__name__)

DASHBOARD_FILE = Path(__file__).parent / "static" / "dashboard.html"
DASHBOARD_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
                 "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_DASHBOARD_HEADERS = {
    "Content-Security-Policy": DASHBOARD_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_FALLBACK_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TokenGate dashboard</title></head>
<body><h1>TokenGate</h1><p>The dashboard page is not installed
(<code>tokengate_fastapi/static/dashboard.html</code> is missing). The admin API under this
prefix works: see <code>/stats</code> and <code>/events</code>.</p></body></html>
"""
LIVE_ROWS = 20
NOT_READY_RETRY_AFTER = 5.0
SSE_RETRY_MS = 1000


def _guarded_rows(what: str, fetch: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    # A broken policy must not end the live stream: log and show nothing for it.
    try:
        return fetch()
    except Exception:
        logger.exception("tokengate /events: could not read %s; sending an empty list", what)
        return []


def _pending_quarantine(coordinator: OperationsCoordinator) -> list[dict[str, Any]]:
    quarantine = find_quarantine(coordinator)
    return [] if quarantine is None else quarantine.list(status="pending", limit=LIVE_ROWS)


def live_snapshot(coordinator: OperationsCoordinator) -> dict[str, Any]:
    """One ``/events`` payload: stats, recent history, operation rows, pending quarantine."""
    stats = stats_snapshot(coordinator)
    return {
        "stats": stats,
        "history": [record.to_dict() for record in coordinator.history(LIVE_ROWS)],
        "operations": _guarded_rows("operations", lambda: operation_rows(coordinator, stats["paused_operations"])),
        "quarantine": _guarded_rows("quarantine", lambda: _pending_quarantine(coordinator)),
    }


def _read_dashboard() -> str:
    try:
        return DASHBOARD_FILE.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _FALLBACK_PAGE


def add_live_routes(
    router: APIRouter,
    *,
    name: Callable[[str], str],
    stream_protected: Sequence[Depends],
    health_deps: Sequence[Depends],
    metrics_deps: Sequence[Depends],
    sse_interval: float,
    sse_max_duration: float,
) -> None:
    """Add the probe and live routes; each *_deps list is empty when that route is public."""
    # One registry per coordinator, owned by this router: nothing global is touched.
    registries: "weakref.WeakKeyDictionary[OperationsCoordinator, CollectorRegistry]" = weakref.WeakKeyDictionary()

    @router.get("/health", response_model=Health, name=name("health"), dependencies=list(health_deps),
                responses=error_responses(401, 503) if health_deps else None, summary="Liveness")
    async def health() -> Health:
        """200 whenever the event loop answers; never depends on load (restarting on load is an outage)."""
        return Health(pid=os.getpid())

    @router.get("/ready", response_model=Ready, name=name("ready"), dependencies=list(health_deps),
                responses={**(error_responses(401) if health_deps else {}),
                           503: {"model": Ready, "description": "Draining, paused or stopped (`Retry-After`)."}},
                summary="Readiness")
    async def ready(coordinator: CoordinatorDep) -> Any:
        """200 while running and neither draining nor paused; else 503 with ``Retry-After``."""
        status: Literal["stopped", "draining", "paused"]
        if not coordinator.running:
            status = "stopped"
        elif coordinator.draining:
            status = "draining"
        elif coordinator.paused:
            status = "paused"
        else:
            return Ready(status="ready", ready=True, pid=os.getpid())
        body = Ready(status=status, ready=False, pid=os.getpid())
        return JSONResponse(body.model_dump(), status_code=503,
                            headers={"Retry-After": retry_after_header(NOT_READY_RETRY_AFTER)})

    @router.get("/metrics", response_class=Response, name=name("metrics"), dependencies=list(metrics_deps),
                responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                                 "description": "Prometheus text exposition."},
                           **(error_responses(401, 503) if metrics_deps else {})},
                summary="Prometheus metrics")
    async def metrics(coordinator: CoordinatorDep) -> Response:
        """The :class:`~tokengate_fastapi.TokengateCollector` families, read at scrape time."""
        registry = registries.get(coordinator)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(TokengateCollector(coordinator))
            registries[coordinator] = registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/events", response_class=EventSourceResponse, name=name("events"),
                dependencies=list(stream_protected), responses=error_responses(401, 422, 503),
                summary="Live stats (Server-Sent Events)")
    async def events(
        coordinator: CoordinatorDep,
        max_events: Annotated[int | None, Query(ge=1, le=1_000_000,
                                                description="End the stream after this many events.")] = None,
    ) -> AsyncIterator[ServerSentEvent]:
        """``event: stats`` every ``sse_interval`` seconds: ``{"stats", "history", "operations", "quarantine"}``.

        Authenticate with the ``Authorization`` header, or with
        ``?access_token=`` for ``EventSource`` (which cannot send headers);
        a token in a URL may reach access logs, so prefer the header.
        """
        deadline = time.monotonic() + sse_max_duration
        sent = 0
        while True:
            yield ServerSentEvent(event="stats", id=str(sent), data=live_snapshot(coordinator),
                                  retry=SSE_RETRY_MS if sent == 0 else None)
            sent += 1
            if (max_events is not None and sent >= max_events) or not coordinator.running \
                    or time.monotonic() >= deadline:
                return
            await asyncio.sleep(sse_interval)

    @router.get("/dashboard", response_class=HTMLResponse, name=name("dashboard"), summary="Live dashboard")
    async def dashboard() -> HTMLResponse:
        """The dashboard page. Open on purpose: it holds no data, and asks for the token itself.

        Served with a strict Content-Security-Policy (no third-party origin,
        no framing); every data route it calls needs the token.
        """
        return HTMLResponse(_read_dashboard(), headers=_DASHBOARD_HEADERS)
