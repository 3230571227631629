"""A real Dask scheduler and worker in this process, on a fixed loopback port, to stop and start again.

Used by the Dask-lane tests that lose the scheduler mid-run
(``tests/lanes/test_dask_scheduler_loss.py``, ``tests/fastapi/test_fastapi_dask_cluster.py``,
``tests/browser/test_dashboard_cluster.py``), through :func:`started_host`.
The servers run on a helper thread's own event loop; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import contextmanager
from typing import Any, Coroutine, Iterator

import distributed

from tokengate.lanes import dask_config

__all__ = ["SchedulerHost", "free_port", "started_host", "WAIT"]

WAIT = 60.0  # upper bound of every wait (never reached when things work)


def free_port() -> int:
    """A loopback port free now (the scheduler binds it again at each start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SchedulerHost:
    """A scheduler and one worker on a helper thread's loop, on one fixed loopback port; stop and start again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.address = f"tcp://127.0.0.1:{port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-dask-host", daemon=True)
        self.thread.start()
        self.scheduler: Any = None
        self.worker: Any = None

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def start(self) -> None:
        async def start() -> None:
            # Their HTTP servers (always started) on loopback, on a free port each: never 8787 or all interfaces.
            self.scheduler = await distributed.Scheduler(host="127.0.0.1", port=self.port, dashboard=False,
                                                         dashboard_address="127.0.0.1:0")
            self.worker = await distributed.Worker(self.address, nthreads=1, host="127.0.0.1", dashboard=False,
                                                   dashboard_address="127.0.0.1:0",
                                                   resources=dict(dask_config.LOCAL_RESOURCES))
        self._run(start())

    def stop_scheduler(self) -> None:
        """The scheduler goes away (its clients and workers lose their connections)."""
        async def stop() -> None:
            await self.scheduler.close()
        self._run(stop())

    def stop_worker(self) -> None:
        async def stop() -> None:
            if self.worker is not None and self.worker.status.name not in ("closed", "closing"):
                await self.worker.close(timeout=10)
        self._run(stop())

    def close(self) -> None:
        async def close() -> None:
            for server in (self.worker, self.scheduler):
                if server is not None:
                    try:
                        await server.close()
                    except Exception:  # noqa: BLE001 - already closed by the test
                        pass
        try:
            self._run(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
            self.loop.close()


@contextmanager
def started_host() -> Iterator[SchedulerHost]:
    """A started :class:`SchedulerHost` on a free loopback port, closed (servers and thread) on exit."""
    host = SchedulerHost(free_port())
    host.start()
    try:
        yield host
    finally:
        host.close()
