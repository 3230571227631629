"""``tokengate_lifespan``: start the coordinator on the server's loop, drain and stop it at shutdown.

As the app's whole lifespan::

    app = FastAPI(lifespan=tokengate_lifespan(workers_per_core=4))

Nested inside the app's own lifespan (FastAPI accepts one ``lifespan=``)::

    tokengate = tokengate_lifespan(drain_timeout=10)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with open_db() as db, tokengate(app) as state:
            yield {**state, "db": db}

The coordinator is created when the server starts (never at import), attached
to the server's running event loop, published as lifespan state
``{"tokengate": coordinator}`` (read by :func:`~tokengate_fastapi.get_coordinator`
through ``request.state``) and as ``app.state.tokengate``.

Unless told otherwise (``warm_processes=False``), the worker processes of the
process lane start with the server (``warm_processes=True``): in parallel, on
their workers' threads, while the server already answers. Startup does not
wait for them; the admin router's ``/ready`` answers 503 ``starting`` until
they are up (``coordinator.ready``), so a load balancer sends no traffic
before, and no request pays a process start-up.

Note:
    Each server process (``uvicorn --workers N``, gunicorn) runs its own
    lifespan and so its own coordinator; admin answers carry ``pid`` for that
    reason. Pass ``fleet_dir=`` (or set ``TOKENGATE_FLEET_DIR``) and the
    coordinators form one fleet that the admin API observes and controls as
    a whole (:mod:`tokengate.fleet`). Anything per event loop (anyio
    limiters, run vars) must likewise be created inside a lifespan, never at
    import.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, AsyncIterator, Callable, TypedDict

from starlette.applications import Starlette

from tokengate import OperationsCoordinator
from tokengate.errors import ConfigurationError

from .dependencies import STATE_KEY
from .fleet import install_snapshot_parts
from ._routes_live import close_event_streams

__all__ = ["tokengate_lifespan", "TokengateLifespan", "TokengateState"]

logger = logging.getLogger(__name__)


class TokengateState(TypedDict):
    """The lifespan state tokengate_lifespan yields (merge it into yours when nesting)."""

    tokengate: OperationsCoordinator


class TokengateLifespan:
    """A lifespan factory: ``lifespan(app)`` is an async context manager yielding :class:`TokengateState`.

    Each entry builds a fresh coordinator (a stopped one cannot restart), so
    one app can be started several times, e.g. by successive test clients.
    Build it with :func:`tokengate_lifespan`.
    """

    def __init__(
        self,
        factory: Callable[[], OperationsCoordinator],
        drain_timeout: float,
        first: OperationsCoordinator | None = None,
    ) -> None:
        self.factory = factory
        self.drain_timeout = drain_timeout
        # A coordinator built eagerly to validate options; used by the first startup.
        self._first = first

    def __call__(self, app: Starlette) -> AbstractAsyncContextManager[TokengateState]:
        """The lifespan context for *app*: entering starts a coordinator, leaving drains and stops it.

        Thread: the server's event loop (Starlette enters it at startup).
        """
        return self._run(app)

    def _take_coordinator(self) -> OperationsCoordinator:
        first, self._first = self._first, None
        coordinator = first if first is not None else self.factory()
        if not isinstance(coordinator, OperationsCoordinator):
            raise ConfigurationError(
                f"coordinator_factory must return an OperationsCoordinator, got {type(coordinator).__name__} "
                f"{coordinator!r}")
        return coordinator

    @asynccontextmanager
    async def _run(self, app: Starlette) -> AsyncIterator[TokengateState]:
        coordinator = self._take_coordinator()
        install_snapshot_parts(coordinator)  # fleet mode: publish what the admin API shows
        await coordinator.astart()
        setattr(app.state, STATE_KEY, coordinator)
        try:
            yield {"tokengate": coordinator}
        finally:
            try:
                await self._shutdown(coordinator)
            finally:
                if getattr(app.state, STATE_KEY, None) is coordinator:
                    delattr(app.state, STATE_KEY)

    async def _shutdown(self, coordinator: OperationsCoordinator) -> None:
        """End the ``/events`` streams, drain (refuse new calls, let accepted ones finish) for up to
        drain_timeout, then stop.

        Whatever is still unsettled after the drain is settled at once with
        ``CoordinatorStopped``: its awaiters get an answer, and the server's
        shutdown is bounded by about ``drain_timeout`` seconds plus one second
        for worker threads to notice (running functions cannot be interrupted).
        Thread: the server's event loop.
        """
        # Live streams first: they would otherwise tick (and hold their task) until the stop.
        await close_event_streams(coordinator)
        report = await coordinator.drain(self.drain_timeout)
        if not report.drained:
            logger.warning(
                "tokengate: %d calls still unsettled after draining for %.1fs at shutdown; "
                "settling them as stopped (raise drain_timeout to wait longer)",
                report.remaining, self.drain_timeout)
        # The drain already waited: stop without a second grace period.
        await coordinator.aclose(timeout=0)

    def __repr__(self) -> str:
        return f"<TokengateLifespan drain_timeout={self.drain_timeout}>"


def tokengate_lifespan(
    *,
    coordinator_factory: Callable[[], OperationsCoordinator] | None = None,
    drain_timeout: float = 30.0,
    **coordinator_options: Any,
) -> TokengateLifespan:
    """Build the lifespan that runs an :class:`~tokengate.OperationsCoordinator` with the app.

    At startup (on the server's event loop) it creates the coordinator and
    starts it attached to that loop (``await coordinator.astart()``); at
    shutdown it drains for up to *drain_timeout* seconds, then stops it
    (``aclose()``), settling anything left with ``CoordinatorStopped``.

    Args:
        coordinator_factory: A zero-argument callable returning a new (not yet
            started) coordinator, called at each startup. Use it for full
            control; it excludes *coordinator_options*.
        drain_timeout: Seconds the shutdown waits for accepted calls to
            finish (default 30). Keep it below your orchestrator's grace
            period (e.g. Kubernetes ``terminationGracePeriodSeconds``).
        **coordinator_options: Keyword arguments of ``OperationsCoordinator``
            (``num_cores``, ``workers_per_core``, ``policies``...). They are
            validated now: one coordinator is built immediately and used by
            the first startup (no thread starts before the server does).
            Later startups reuse the same policy objects; pass a factory if
            each startup needs fresh ones. ``warm_processes`` defaults to
            True here (the core's default is False): worker processes start
            with the server, not on the first request. A factory chooses for
            itself.

    Returns:
        A callable for ``FastAPI(lifespan=...)``; call it with the app to nest
        it in another lifespan.

    Raises:
        ConfigurationError: for a bad option, for both a factory and options,
            or for a negative or non-numeric *drain_timeout*.
    """
    if isinstance(drain_timeout, bool) or not isinstance(drain_timeout, (int, float)) \
            or not math.isfinite(drain_timeout) or drain_timeout < 0:
        raise ConfigurationError(f"drain_timeout must be a finite number of seconds >= 0, got {drain_timeout!r}")
    if coordinator_factory is not None:
        if coordinator_options:
            raise ConfigurationError(
                f"pass either coordinator_factory or coordinator options, not both "
                f"(got options {sorted(coordinator_options)!r}); set them inside the factory")
        if not callable(coordinator_factory):
            raise ConfigurationError(f"coordinator_factory must be callable, got {coordinator_factory!r}")
        return TokengateLifespan(coordinator_factory, float(drain_timeout))

    # A server should not make its first process-lane request pay for starting processes
    # (with process_workers=0 there is nothing to warm, so the option is left out).
    if coordinator_options.get("process_workers") != 0:
        coordinator_options.setdefault("warm_processes", True)

    def factory() -> OperationsCoordinator:
        return OperationsCoordinator(**coordinator_options)

    try:
        first = factory()
    except TypeError as exc:  # an unknown keyword: say which function it went to
        raise ConfigurationError(f"tokengate_lifespan: bad OperationsCoordinator option: {exc}") from None
    return TokengateLifespan(factory, float(drain_timeout), first)
