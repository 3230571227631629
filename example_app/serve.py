"""Serve the example app with uvicorn, shutting down in an order that answers every accepted request.

uvicorn's own order on SIGTERM is: stop listening, wait up to
``--timeout-graceful-shutdown`` for open requests, cancel whatever is left,
and only then run the lifespan shutdown (tokengate's drain). A request
awaiting a call longer than that timeout is cancelled (its client gets a
reset or a plain 500, and the log a ``CancelledError`` traceback) before the
drain even starts. :class:`DrainFirstServer` turns that around:

1. On the first SIGTERM or SIGINT the coordinator **drains** at once: its
   gate closes, so a new request that would start work is answered 503
   ``gate_closed`` with ``Retry-After`` (the server still listens, so a
   client or load balancer that has not noticed yet gets that answer, not a
   refused connection), and ``/tokengate/ready`` answers 503 ``draining``.
   Accepted calls run to the end; their requests get their normal answers.
2. When everything accepted has settled, or after ``drain_timeout``, the
   coordinator **stops**: a call still running then is settled with
   ``CoordinatorStopped``, so its request is answered 503
   ``coordinator_stopped`` instead of waiting; ``/events`` streams end.
3. Then uvicorn's own shutdown runs: it stops listening and waits up to
   ``timeout_graceful_shutdown`` for responses still being written (by now
   none waits for work), then the lifespan shutdown (nothing left to drain).

A second signal during step 1 or 2 skips to uvicorn's shutdown at once (a
third SIGINT forces the exit, as uvicorn does). As with uvicorn, the process
then ends by re-raising the signal it got (exit status 143 for SIGTERM).
The whole shutdown takes at most about ``drain_timeout`` + 1.5 s (stopping
abandons threads still inside a function after 0.5 s; streams notice within
their one-second tick) + the time to write the last responses.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from tokengate import OperationsCoordinator
from tokengate_fastapi.dependencies import STATE_KEY

__all__ = ["DrainFirstServer", "serve"]

logger = logging.getLogger(__name__)


class DrainFirstServer(uvicorn.Server):
    """A ``uvicorn.Server`` that drains and stops the app's coordinator before closing (see the module doc).

    Args:
        config: The uvicorn configuration; its ``app`` must be *app*.
        app: The FastAPI app whose lifespan runs the coordinator (found in ``app.state``).
        drain_timeout: Seconds the drain waits for accepted calls before stopping the coordinator.
    """

    def __init__(self, config: uvicorn.Config, *, app: FastAPI, drain_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        """Serve until a signal, remembering the loop so the signal handler can start the drain on it."""
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: start the drain; any later one (or one before startup): uvicorn's own handling."""
        loop = self._loop
        if self._signalled or loop is None or not self.started or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        # A signal handler runs between two bytecodes of the loop's thread: schedule, do not run, the drain.
        loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        coordinator = getattr(self._app.state, STATE_KEY, None)
        try:
            if isinstance(coordinator, OperationsCoordinator) and coordinator.running:
                logger.warning("%s: draining for up to %.1f s before the server stops (new calls answer 503 "
                               "gate_closed)", signal.Signals(sig).name, self.drain_timeout)
                report = await coordinator.drain(self.drain_timeout)
                if not report.drained:
                    logger.warning("%d calls still unsettled after draining for %.1f s; stopping the coordinator "
                                   "(their requests answer 503 coordinator_stopped)",
                                   report.remaining, self.drain_timeout)
                # Stop now, not in the lifespan: uvicorn waits for open requests (and /events streams)
                # before it runs the lifespan shutdown, so nothing may still be waiting for work then.
                await coordinator.aclose(timeout=0)
        finally:
            if not self.should_exit:  # a second signal may have started uvicorn's shutdown already
                super().handle_exit(sig, None)


def serve(app: FastAPI, *, host: str, port: int, log_level: str, drain_timeout: float,
          timeout_graceful_shutdown: int) -> None:
    """Run *app* with :class:`DrainFirstServer` until a signal has drained it and it has shut down.

    *timeout_graceful_shutdown* (whole seconds, uvicorn's option) bounds the
    wait for responses still being written once the coordinator has stopped.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=timeout_graceful_shutdown)
    DrainFirstServer(config, app=app, drain_timeout=drain_timeout).run()
