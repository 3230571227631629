"""The Dask lane when its scheduler is lost mid-run and comes back on the same address.

A real ``distributed.Scheduler`` and one ``Worker`` run in this process on a
helper thread's own event loop, on a fixed 127.0.0.1 port, so the test can stop
the scheduler while a call is running on the worker and start a new one on the
same port. Every wait is bounded (``WAIT``); nothing asserts on timing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

distributed = pytest.importorskip("distributed")

from dask_host import SchedulerHost, started_host  # noqa: E402

from tokengate import OperationsCoordinator  # noqa: E402
from tokengate.errors import Rejected  # noqa: E402
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


@pytest.fixture
def host() -> Iterator[SchedulerHost]:
    with started_host() as h:
        yield h


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
        pushed = _cluster(coordinator)["pushed"]
        assert df.square(5).get(timeout=WAIT) == 25
        assert _cluster(coordinator)["reconnects"] >= 1
        # and small results still come back with their task's end (subscribed on the new scheduler)
        assert _cluster(coordinator)["pushed"] == pushed + 1
    finally:
        coordinator.stop()


def test_calls_queued_before_the_loss_all_settle_unavailable(host: SchedulerHost) -> None:
    # Given 3,000 accepted calls held by an operation pause, on a lane with one slot per domain
    coordinator = OperationsCoordinator(num_cores=2, policies=[], stop_timeout=10.0, dask_address=host.address,
                                        warm_dask=True, dask_inflight=1)
    coordinator.start()
    try:
        assert df.square(2).get(timeout=WAIT) == 4
        coordinator.pause("dask.square")
        held = [df.square(i) for i in range(3000)]
        # When the scheduler is lost, and then the pause is lifted
        host.stop_scheduler()
        host.stop_worker()
        _until(lambda: _cluster(coordinator)["state"] == "unavailable", "the lane to see the scheduler gone")
        coordinator.resume("dask.square")
        # Then each of them settles with ClusterUnavailable, one after another through the one slot
        # (each failure frees the slot for the next call without nesting: no RecursionError)
        for token in held:
            with pytest.raises(ClusterUnavailable):
                token.get(timeout=WAIT)
        assert _cluster(coordinator)["refused_unavailable"] >= 3000
    finally:
        coordinator.stop()
