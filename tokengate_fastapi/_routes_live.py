"""Admin routes for probes and live views: /health, /ready, /metrics, /events (SSE), /dashboard.

Part of :func:`tokengate_fastapi.admin_router`.

``/events`` sends ``event: stats`` every ``sse_interval`` seconds; its
``data`` is one JSON object (see :func:`live_snapshot`)::

    {"stats": {...GET /stats...}, "history": [last 20 execution records, newest first],
     "operations": [GET /operations rows], "quarantine": [first 20 pending records]}

One snapshot per tick, whatever the number of streams: a broadcaster per
coordinator (a task on the server's loop, started when the first stream
opens and stopped when the last one ends, or at lifespan shutdown) builds
and JSON-encodes the snapshot once and hands the same bytes to every open
stream. A stream that falls behind (a slow client) skips to the newest
snapshot, so it never queues old ones; the event ``id`` is the snapshot's
sequence number, so a gap says snapshots were skipped. Open streams are
capped (``sse_max_streams``): past the cap ``/events`` answers 503
``overloaded`` with ``Retry-After``.

The stream ends when the client disconnects, when the coordinator stops
(after one last snapshot), after ``max_events`` events, after
``sse_max_duration`` seconds, or at lifespan shutdown; the first event
carries ``retry: 1000`` so ``EventSource`` reconnects by itself about a
second later. The bounded duration matters: uvicorn's graceful shutdown waits
for open responses (unless ``--timeout-graceful-shutdown`` is set), and an
endless stream would hold it until the browser goes away. With a long
``sse_interval`` a ``: ping`` comment every 15 s keeps proxies from closing
an idle stream.
"""

import asyncio
import json
import logging
import math
import os
import time
import weakref
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Callable, Literal, NamedTuple, Sequence

from fastapi import APIRouter, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import Receive, Scope, Send

from tokengate import OperationsCoordinator

from .dependencies import STATE_KEY, CoordinatorDep
from .fleet import Scope as FleetScope, fleet_health, fleet_of
from .errors import AdminError, ErrorCode, retry_after_header
from .metrics import FixedCollector, TokengateCollector, fleet_families
from .schemas import ErrorBody, FleetHealth, Health, Ready, error_responses
from ._lanes import operation_lanes, process_counts, with_lanes, worker_lanes
from ._policies import find_quarantine, operation_rows
from ._routes_pool import stats_snapshot

__all__ = ["add_live_routes", "live_snapshot", "close_event_streams", "open_event_streams", "encode_snapshot",
           "DASHBOARD_CSP", "EventStream", "LiveStreams"]

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
#: Retry-After of /ready while worker processes start (each takes well under a second).
STARTING_RETRY_AFTER = 1.0
#: Retry-After of a 503 past the stream cap: a slot frees when any stream ends.
STREAMS_FULL_RETRY_AFTER = 5.0
SSE_RETRY_MS = 1000
#: Seconds a stream may stay silent before it sends a ``: ping`` comment (proxies close idle streams).
SSE_PING_INTERVAL = 15.0
_PING = b": ping\n\n"
_RETRY_FIELD = f"retry: {SSE_RETRY_MS}\n".encode()
#: Streams woken per event-loop turn when a snapshot is published.
_WAKE_CHUNK = 64
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: The documented 200 of /events: the SSE item schema FastAPI gives generator endpoints.
_EVENTS_200 = {"content": {
    "text/event-stream": {"itemSchema": {"type": "object", "properties": {
        "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0}}}}}}


#: Seconds between two tracebacks for the same failing part of a snapshot (one per tick would flood the log).
GUARDED_LOG_INTERVAL = 60.0
_guarded_logged_at: dict[str, float] = {}


def _guarded_rows(what: str, fetch: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    # A broken policy must not end the live stream: log and show nothing for it.
    try:
        return fetch()
    except Exception:
        now = time.monotonic()
        last = _guarded_logged_at.get(what)
        if last is None or now - last >= GUARDED_LOG_INTERVAL:
            _guarded_logged_at[what] = now
            logger.exception("tokengate /events: could not read %s; sending an empty list (logged at most "
                             "once a minute while it fails)", what)
        else:
            logger.debug("tokengate /events: could not read %s again", what, exc_info=True)
        return []


def _pending_quarantine(coordinator: OperationsCoordinator) -> list[dict[str, Any]]:
    quarantine = find_quarantine(coordinator)
    return [] if quarantine is None else quarantine.list(status="pending", limit=LIVE_ROWS)


def live_snapshot(coordinator: OperationsCoordinator) -> dict[str, Any]:
    """One ``/events`` payload: stats, recent history, operation rows, pending quarantine."""
    stats = stats_snapshot(coordinator)
    lanes = worker_lanes(stats)
    return {
        "stats": stats,
        "history": with_lanes([record.to_dict() for record in coordinator.history(LIVE_ROWS)], lanes),
        "operations": _guarded_rows("operations", lambda: operation_rows(
            coordinator, stats["paused_operations"], operation_lanes(coordinator, lanes))),
        "quarantine": _guarded_rows("quarantine", lambda: _pending_quarantine(coordinator)),
    }


def _finite(value: Any) -> Any:
    # JSON has no NaN or Infinity: send null, as FastAPI does for its own responses.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_snapshot(snapshot: dict[str, Any]) -> bytes:
    """*snapshot* as compact one-line JSON (non-finite floats become null; other types via jsonable_encoder)."""
    try:
        text = json.dumps(snapshot, separators=(",", ":"), allow_nan=False, default=jsonable_encoder)
    except ValueError:  # a NaN or an infinity somewhere: rare, so only then walk the whole tree
        text = json.dumps(_finite(jsonable_encoder(snapshot)), separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


class _Tick(NamedTuple):
    """One published snapshot: its sequence number, its SSE frame, and whether it is the last."""

    seq: int
    frame: bytes
    final: bool


class _Timeout:
    """What :meth:`_Broadcaster.next` returns when nothing was published in time."""


_TIMED_OUT = _Timeout()


class _Broadcaster:
    """Builds one ``/events`` snapshot per tick for one coordinator and wakes every stream waiting for it.

    Started by the first stream (:meth:`LiveStreams.subscribe`), stopped when
    the last one leaves, when the coordinator stops (after a final snapshot),
    or by :func:`close_event_streams`. Streams read :attr:`latest` and wait
    for the next one with :meth:`next`; nothing is queued per stream.
    Thread: the server's event loop.
    """

    def __init__(self, coordinator: OperationsCoordinator, interval: float) -> None:
        self.coordinator = coordinator
        self.interval = interval
        self.subscribers = 0
        self.latest: _Tick | None = None
        self.closed = False
        self._seq = 0
        # One future per waiting stream: cancelling one stream never disturbs another's wait.
        self._waiters: set[asyncio.Future[None]] = set()
        self._task: asyncio.Task[None] | None = None
        _registry.add(self)

    def start(self) -> None:
        """Start ticking (idempotent); the first snapshot is built on the loop's next turn."""
        if self._task is None and not self.closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"tokengate-events:{self.coordinator.name}")

    async def _run(self) -> None:
        failing = False
        try:
            while True:
                final = not self.coordinator.running
                try:
                    data = encode_snapshot(live_snapshot(self.coordinator))
                except Exception:
                    # Keep ticking: the next snapshot may work. Logged once per failing streak.
                    if not failing:
                        logger.exception("tokengate /events: could not build a snapshot; streams get none "
                                         "until one succeeds")
                    failing = True
                else:
                    if failing:
                        logger.warning("tokengate /events: snapshots work again")
                    failing = False
                    await self._publish(data, final)
                    if final:
                        return
                await asyncio.sleep(self.interval)
        finally:
            self._end()

    async def _publish(self, data: bytes, final: bool) -> None:
        self.latest = _Tick(self._seq, b"event: stats\nid: %d\ndata: %s\n\n" % (self._seq, data), final)
        self._seq += 1
        # Wake the streams a chunk per loop turn: between chunks the loop polls its sockets, so a
        # light request never waits behind the whole fan-out (each woken stream writes its frame).
        waiters, self._waiters = self._waiters, set()
        pending = iter(waiters)
        try:
            for count, waiter in enumerate(pending, 1):
                if not waiter.done():
                    waiter.set_result(None)
                if count % _WAKE_CHUNK == 0:
                    await asyncio.sleep(0)
        finally:
            # Stopped between two chunks: the rest still get their wake-up (they then see it ended).
            for waiter in pending:
                if not waiter.done():
                    waiter.set_result(None)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _end(self) -> None:
        # Streams waiting for a tick that will never come get None and end.
        self.closed = True
        self._wake()

    async def next(self, after: int, timeout: float) -> "_Tick | None | _Timeout":
        """The first snapshot newer than sequence *after* (the newest one: older ones are skipped).

        Returns None once the broadcaster has ended, or ``_TIMED_OUT`` when
        nothing newer came within *timeout* seconds.
        """
        latest = self.latest
        if latest is not None and latest.seq > after:
            return latest
        if self.closed:
            return None
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.add(waiter)
        timer = loop.call_later(timeout, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiters.discard(waiter)
        latest = self.latest
        if latest is not None and latest.seq > after:
            return latest
        return None if self.closed else _TIMED_OUT

    def stop(self) -> None:
        """Stop ticking now; waiting streams end. Idempotent."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        self._end()

    async def aclose(self) -> None:
        """Stop, and wait until the ticking task has finished."""
        task = self._task
        self.stop()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)


def _time_out(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


# Every broadcaster alive in this process, weakly: how the lifespan finds a coordinator's streams.
_registry: "weakref.WeakSet[_Broadcaster]" = weakref.WeakSet()


def open_event_streams(coordinator: OperationsCoordinator) -> int:
    """How many ``/events`` streams are open on *coordinator*, over every admin router."""
    return sum(b.subscribers for b in list(_registry) if b.coordinator is coordinator)


async def close_event_streams(coordinator: OperationsCoordinator) -> None:
    """End every ``/events`` stream of *coordinator* and stop its broadcasters (lifespan shutdown).

    Each open stream ends after the event it is sending; a stream opened
    afterwards sees a stopped coordinator and ends after one snapshot.
    Thread: the server's event loop.
    """
    for broadcaster in [b for b in list(_registry) if b.coordinator is coordinator]:
        await broadcaster.aclose()


class _Subscription:
    """One open stream's claim on a broadcaster; :meth:`close` gives the slot back (once)."""

    def __init__(self, streams: "LiveStreams", broadcaster: _Broadcaster) -> None:
        self._streams = streams
        self._broadcaster = broadcaster
        self._open = True

    async def frames(self, max_events: int | None, duration: float) -> AsyncIterator[bytes]:
        """The stream's body: SSE frames (the latest snapshot at once, then one per tick), pings when idle."""
        broadcaster = self._broadcaster
        deadline = time.monotonic() + duration
        sent = 0
        after = -1
        while True:
            remaining = deadline - time.monotonic()
            if sent and remaining <= 0:
                return
            tick = await broadcaster.next(after, max(0.0, min(SSE_PING_INTERVAL, remaining) if sent
                                                        else SSE_PING_INTERVAL))
            if tick is None:
                return
            if isinstance(tick, _Timeout):
                if time.monotonic() < deadline:
                    yield _PING
                continue
            yield tick.frame if sent else _RETRY_FIELD + tick.frame
            sent += 1
            after = tick.seq
            if tick.final or (max_events is not None and sent >= max_events):
                return

    def close(self) -> None:
        """Release the slot; the broadcaster stops when this was its last stream. Idempotent."""
        if self._open:
            self._open = False
            self._streams._release(self._broadcaster)


class EventStream(StreamingResponse):
    """The ``/events`` response: streams the subscription's frames, and always releases it at the end.

    The release runs when the ASGI call ends however it ends (the stream
    finished, the client left, the server cancelled the request).
    """

    media_type = "text/event-stream"

    def __init__(self, subscription: _Subscription, frames: AsyncIterator[bytes]) -> None:
        super().__init__(frames, headers=_STREAM_HEADERS)
        self._subscription = subscription
        self._frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._subscription.close()
            aclose = getattr(self._frames, "aclose", None)
            if aclose is not None:
                await aclose()  # a generator left at a yield: closed now, not by the garbage collector


class LiveStreams:
    """The ``/events`` streams of one admin router: a broadcaster per coordinator, and the cap on streams.

    Thread: the server's event loop.
    """

    def __init__(self, interval: float, max_streams: int) -> None:
        self.interval = interval
        self.max_streams = max_streams
        self.open = 0
        self._broadcasters: "weakref.WeakKeyDictionary[OperationsCoordinator, _Broadcaster]" = \
            weakref.WeakKeyDictionary()

    def subscribe(self, coordinator: OperationsCoordinator) -> _Subscription:
        """Claim a stream slot on *coordinator*'s broadcaster (started if needed).

        Raises:
            AdminError: 503 ``overloaded`` with ``Retry-After`` when
                ``max_streams`` streams are already open on this router.
        """
        if self.open >= self.max_streams:
            raise AdminError(503, ErrorCode.OVERLOADED,
                             f"too many open /events streams ({self.open} of at most {self.max_streams}, "
                             "admin_router(sse_max_streams=...)); retry later or poll GET /stats",
                             headers={"Retry-After": retry_after_header(STREAMS_FULL_RETRY_AFTER)},
                             retry_after=STREAMS_FULL_RETRY_AFTER, limit=self.max_streams)
        broadcaster = self._broadcasters.get(coordinator)
        if broadcaster is None or broadcaster.closed:
            broadcaster = _Broadcaster(coordinator, self.interval)
            self._broadcasters[coordinator] = broadcaster
        broadcaster.subscribers += 1
        self.open += 1
        broadcaster.start()
        return _Subscription(self, broadcaster)

    def _release(self, broadcaster: _Broadcaster) -> None:
        self.open -= 1
        broadcaster.subscribers -= 1
        if broadcaster.subscribers <= 0:
            broadcaster.stop()  # nobody listens: no snapshot is built for nobody
            if self._broadcasters.get(broadcaster.coordinator) is broadcaster:
                del self._broadcasters[broadcaster.coordinator]


def _read_dashboard() -> str:
    try:
        return DASHBOARD_FILE.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _FALLBACK_PAGE


def _member(coordinator: OperationsCoordinator) -> str | None:
    fleet = fleet_of(coordinator)
    return None if fleet is None else fleet.member_id


def _has_process_lane(coordinator: OperationsCoordinator) -> bool:
    # Saves /ready a stats() snapshot on a coordinator without worker processes.
    return coordinator.process_routing is not None


def add_live_routes(
    router: APIRouter,
    *,
    name: Callable[[str], str],
    stream_protected: Sequence[Depends],
    health_deps: Sequence[Depends],
    metrics_deps: Sequence[Depends],
    sse_interval: float,
    sse_max_duration: float,
    sse_max_streams: int,
) -> None:
    """Add the probe and live routes; each *_deps list is empty when that route is public."""
    streams = LiveStreams(sse_interval, sse_max_streams)
    # One registry per coordinator, owned by this router: nothing global is touched.
    registries: "weakref.WeakKeyDictionary[OperationsCoordinator, CollectorRegistry]" = weakref.WeakKeyDictionary()

    @router.get("/health", response_model=Health, name=name("health"), dependencies=list(health_deps),
                responses=error_responses(401, 503) if health_deps else None, summary="Liveness")
    async def health(request: Request, scope: FleetScope = "fleet") -> Health:
        """200 whenever the event loop answers; never depends on load (restarting on load is an outage).

        Liveness is this process's own. In a fleet, ``fleet`` also lists
        every live member with its heartbeat and snapshot ages (and whether
        its loop looks stuck), and the members that left or died recently.
        """
        coordinator = getattr(request.state, STATE_KEY, None) or getattr(request.app.state, STATE_KEY, None)
        fleet = fleet_of(coordinator, scope) if isinstance(coordinator, OperationsCoordinator) else None
        if fleet is None:
            return Health(pid=os.getpid())
        return Health(pid=os.getpid(), member=fleet.member_id, fleet=FleetHealth.model_validate(fleet_health(fleet)))

    @router.get("/ready", response_model=Ready, name=name("ready"), dependencies=list(health_deps),
                responses={**(error_responses(401) if health_deps else {}),
                           503: {"model": Ready, "description": (
                               "Worker processes still starting (`starting`), a required Dask lane without "
                               "its scheduler (`cluster_unavailable`), draining, paused or stopped "
                               "(`Retry-After`)."),
                               "headers": {"Retry-After": {
                                   "description": "Whole seconds to wait before asking again.",
                                   "schema": {"type": "string", "pattern": "^[0-9]+$"}}}}},
                summary="Readiness")
    async def ready(coordinator: CoordinatorDep) -> Any:
        """200 while running, every worker process up, a required Dask lane connected, and neither draining nor
        paused; else 503.

        Always this process's own readiness, also in a fleet (an orchestrator
        asks each process about itself); ``member`` names it.

        The 503 names why in ``status`` (``starting``: the process lane's
        worker processes are not all up yet, see ``processes_ready`` of
        ``processes``) and carries ``Retry-After`` (1 s while starting, 5 s
        otherwise).
        """
        status: Literal["stopped", "starting", "cluster_unavailable", "draining", "paused"]
        # Readiness first, the counts after: processes only come up, so a "ready"
        # answer never shows fewer processes up than it has.
        processes_up = coordinator.ready
        counts = process_counts(coordinator.stats()) if _has_process_lane(coordinator) else None
        total, up = counts if counts is not None else (None, None)
        cluster = coordinator.cluster()
        cluster_state = None if cluster is None else str(cluster["state"])
        retry_after = NOT_READY_RETRY_AFTER
        if not coordinator.running:
            status = "stopped"
        elif coordinator.draining:
            status = "draining"
        elif coordinator.paused:
            status = "paused"
        elif not processes_up:
            # A required Dask lane without its scheduler (lost, or still connecting) is what holds it back.
            if cluster is not None and cluster["required"] and cluster_state not in ("connected", "new"):
                status = "cluster_unavailable"
            else:
                status, retry_after = "starting", STARTING_RETRY_AFTER
        else:
            return Ready(status="ready", ready=True, pid=os.getpid(), processes=total, processes_ready=up,
                         cluster=cluster_state, member=_member(coordinator))
        body = Ready(status=status, ready=False, pid=os.getpid(), processes=total, processes_ready=up,
                     cluster=cluster_state, member=_member(coordinator))
        return JSONResponse(body.model_dump(), status_code=503,
                            headers={"Retry-After": retry_after_header(retry_after)})

    @router.get("/metrics", response_class=Response, name=name("metrics"), dependencies=list(metrics_deps),
                responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                                 "description": "Prometheus text exposition."},
                           **(error_responses(401, 503) if metrics_deps else {})},
                summary="Prometheus metrics")
    async def metrics(coordinator: CoordinatorDep, scope: FleetScope = "fleet") -> Response:
        """The :class:`~tokengate_fastapi.TokengateCollector` families, read at scrape time.

        In a fleet: every member's families with a ``member`` label and the
        ``tokengate_fleet_*`` totals, read from the fleet file at scrape time
        (see :func:`~tokengate_fastapi.metrics.fleet_families`), so any
        process answers for all of them. Should that read fail, this
        process's own figures are served (and the failure logged).
        """
        fleet = fleet_of(coordinator, scope)
        if fleet is not None:
            try:
                view = await fleet.scrape()
            except (RuntimeError, asyncio.TimeoutError) as exc:
                logger.warning("tokengate /metrics: could not read the fleet (%s); serving this process only", exc)
            else:
                scrape = CollectorRegistry(auto_describe=False)
                scrape.register(FixedCollector(fleet_families(view, now=fleet.clock())))
                return Response(generate_latest(scrape), media_type=CONTENT_TYPE_LATEST)
        registry = registries.get(coordinator)
        if registry is None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(TokengateCollector(coordinator))
            registries[coordinator] = registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # Not FastAPI's EventSourceResponse: that response class makes FastAPI run the endpoint as
    # a generator with two helper tasks per stream; ours writes the shared frames directly.
    @router.get("/events", response_class=EventStream, status_code=200, name=name("events"),
                response_description="A `text/event-stream` of `event: stats` events.",
                dependencies=list(stream_protected),
                responses={200: _EVENTS_200, **error_responses(401, 422),
                           503: {"model": ErrorBody, "description": (
                               "No admin token configured (`admin_token_not_configured`), the coordinator is "
                               "not running, or `sse_max_streams` streams are open (`overloaded`, "
                               "`Retry-After`).")}},
                summary="Live stats (Server-Sent Events)")
    async def events(
        coordinator: CoordinatorDep,
        max_events: Annotated[int | None, Query(ge=1, le=1_000_000,
                                                description="End the stream after this many events.")] = None,
    ) -> Response:
        """``event: stats`` every ``sse_interval`` seconds: ``{"stats", "history", "operations", "quarantine"}``.

        Every stream gets the same snapshot, built once per tick; a slow
        client skips to the newest one (the ``id`` is the snapshot's number).
        Past ``sse_max_streams`` open streams: 503 ``overloaded`` with
        ``Retry-After``.

        Authenticate with the ``Authorization`` header, or with
        ``?access_token=`` for ``EventSource`` (which cannot send headers);
        a token in a URL may reach access logs, so prefer the header.
        """
        subscription = streams.subscribe(coordinator)
        return EventStream(subscription, subscription.frames(max_events, sse_max_duration))

    @router.get("/dashboard", response_class=HTMLResponse, name=name("dashboard"), summary="Live dashboard")
    async def dashboard() -> HTMLResponse:
        """The dashboard page. Open on purpose: it holds no data, and asks for the token itself.

        Served with a strict Content-Security-Policy (no third-party origin,
        no framing); every data route it calls needs the token.
        """
        return HTMLResponse(_read_dashboard(), headers=_DASHBOARD_HEADERS)
