"""The Dask lane when its scheduler is lost mid-run and comes back on the same address.

A real ``distributed.Scheduler`` and one ``Worker`` run in this process on a
helper thread's own event loop, on a fixed 127.0.0.1 port, so the test can stop
the scheduler while a call is running on the worker and start a new one on the
same port. Every wait is bounded (``WAIT``); nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator

import pytest

distributed = pytest.importorskip("distributed")

from tokengate import OperationsCoordinator  # noqa: E402
from tokengate.errors import Rejected  # noqa: E402
from tokengate.lanes import dask as dask_lane  # noqa: E402
from tokengate.lanes.dask_errors import ClusterDown, ClusterUnavailable  # noqa: E402

from . import dask_functions as df  # noqa: E402

WAIT = 60.0  # upper bound of every wait (never reached when things work)

pytestmark = pytest.mark.slow  # about 5-10 s: two scheduler starts and a client reconnect


def _until(check: Callable[[], bool], what: str, limit: float = WAIT) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {limit}s")
        time.sleep(0.02)


def _free_port() -> int:
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
            self.scheduler = await distributed.Scheduler(host="127.0.0.1", port=self.port, dashboard=False)
            self.worker = await distributed.Worker(self.address, nthreads=1, host="127.0.0.1", dashboard=False,
                                                   resources=dict(dask_lane.LOCAL_RESOURCES))
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


@pytest.fixture
def host() -> Iterator[SchedulerHost]:
    h = SchedulerHost(_free_port())
    h.start()
    try:
        yield h
    finally:
        h.close()


def _cluster(coordinator: OperationsCoordinator) -> dict[str, Any]:
    return coordinator.stats()["lanes"]["dask"]["cluster"]  # type: ignore[no-any-return]


def test_scheduler_lost_mid_run_refuses_at_submit_then_reconnects(host: SchedulerHost, tmp_path: Path) -> None:
    # Given a coordinator connected to the scheduler, with a call running on its worker
    coordinator = OperationsCoordinator(num_cores=2, policies=[], stop_timeout=10.0, dask_address=host.address,
                                        warm_dask=True)
    coordinator.start()
    try:
        assert df.square(3).get(timeout=WAIT) == 9
        started, release = tmp_path / "started", tmp_path / "release"
        running = df.block(str(started), str(release))
        _until(started.exists, "the call to start on the Dask worker")

        # When the scheduler goes away
        host.stop_scheduler()

        # Then the call in flight settles with the typed error (it may have run partly) ...
        with pytest.raises(ClusterUnavailable) as lost:
            running.get(timeout=WAIT)
        assert not isinstance(lost.value, Rejected)  # accepted earlier: settled, not refused
        release.write_text("go")  # let the worker's thread finish the abandoned call
        host.stop_worker()
        _until(lambda: _cluster(coordinator)["state"] == "unavailable", "the lane to see the scheduler gone")
        assert _cluster(coordinator)["lost"] >= 1
        assert not coordinator.ready  # a required lane without its scheduler holds readiness back

        # ... and a new Dask-lane call is refused at submit, with a typed 503-mapped error
        with pytest.raises(ClusterDown) as refused:
            df.square(4)
        assert isinstance(refused.value, ClusterUnavailable) and isinstance(refused.value, Rejected)
        assert refused.value.address == host.address
        assert _cluster(coordinator)["refused_at_submit"] >= 1
        # while the thread lane keeps serving
        assert coordinator.stats()["counts"]["rejected"] >= 1

        # When a scheduler (and a worker) come back on the same address
        host.start()

        # Then the coordinator reconnects and Dask-lane calls run again
        _until(lambda: _cluster(coordinator)["state"] == "connected", "the lane to reconnect")
        assert coordinator.ready
        _until(lambda: len(_cluster(coordinator)["workers"]) >= 1, "the new worker in the lane's list")
        assert df.square(5).get(timeout=WAIT) == 25
        assert _cluster(coordinator)["reconnects"] >= 1
    finally:
        coordinator.stop()
