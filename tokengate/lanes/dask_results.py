"""How a Dask-lane call's outcome comes back from the cluster: pushed results, batched gathers, errors.

:class:`DaskResults` is the half of a :class:`~tokengate.lanes.dask.DaskLane`
that waits for the calls :mod:`tokengate.lanes.dask_calls` submitted (the lane
owns one, as ``lane.results``; ``DaskCalls`` hands it each future to watch, and
the lane subscribes :meth:`DaskResults.on_pushed` to its result topic). Every
outcome is set with ``DaskCalls.finish``, from the loop, where it arrives (no
thread hop either way):

* A small result comes back as a Dask event with its task's end (see
  :mod:`tokengate.lanes._dask_task`): :meth:`DaskResults.on_pushed`.
* Others, finishing together, are fetched with one ``client.gather`` (on a
  saturated cluster, they wait briefly for each other: see ``_queue_gather``),
  one by one if that fails.
* A task that failed settles with its function's own exception (with the
  remote traceback), :class:`~tokengate.errors.WorkerCrashed` after Dask's
  ``KilledWorker``; a cancelled one with
  :class:`~tokengate.lanes.dask_errors.ClusterUnavailable` when the connection
  was lost, else :class:`~tokengate.lanes.dask_errors.TaskCancelledOnCluster`.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from typing import TYPE_CHECKING, Any

from ..errors import WorkerCrashed
from .dask_errors import ClusterUnavailable, TaskCancelledOnCluster

if TYPE_CHECKING:
    from .dask import DaskLane
    from .dask_calls import DaskCall

__all__ = ["DaskResults"]

# While the cluster is saturated, a finished call's result waits to be fetched with others: at most
# this share of the time the call has spent on the cluster, and at most _GATHER_WINDOW seconds ...
_GATHER_SHARE = 0.1
_GATHER_WINDOW = 0.1
# ... or until this many results are in (the size of one gather).
_GATHER_BATCH = 64


class DaskResults:
    """The outcomes of one :class:`~tokengate.lanes.dask.DaskLane`'s submitted calls (see the module docstring).

    Thread: the coordinator's loop (everything here).
    """

    def __init__(self, lane: DaskLane) -> None:
        self.lane = lane
        self.calls = lane.calls
        self.counts = lane.counts  # the lane's counters (the same dict)
        self._to_gather: list[DaskCall] = []  # finished on the cluster, result not fetched yet (loop only)
        self._gather_soon = False  # a _start_gather is scheduled with call_soon (loop only)
        self._gather_later: asyncio.TimerHandle | None = None  # ... or waits for more results (loop only)
        self._fetching = 0  # calls in a client.gather under way (finished on the cluster; loop only)

    async def watch(self, call: DaskCall, future: Any) -> None:
        """Wait for the task to end; fetch finished results in batches. Thread: loop."""
        try:
            await future.exception()  # waits without fetching the result (public, in asynchronous mode)
        except BaseException:  # noqa: BLE001 - cancelled futures raise here on some versions
            pass
        if call.settled:
            return
        status = future.status
        if status == "finished":
            self._queue_gather(call)
            return
        if status == "error":
            exc = await future.exception()
            tb = await future.traceback()
            self.calls.finish(call, self._translate(exc, tb), True)
            return
        # cancelled: by a lost connection, or by someone else
        reason = _cancel_reason(future)
        lane = self.lane
        client = lane.client
        # Lost with the connection: Dask says so in the reason, or its client is no longer running
        # (a scheduler closing may cancel futures with another reason before the client notices).
        if "connection" in reason or client is None or client.status != "running":
            self.counts["lost"] += 1
            outcome: BaseException = ClusterUnavailable(
                f"the connection to the Dask scheduler was lost while task {call.key} was on the cluster "
                "(it may have run partly)", address=lane.address, reason="connection lost")
            lane.check_connection()
        else:
            outcome = TaskCancelledOnCluster(f"task {call.key} was cancelled on the Dask cluster: {reason}",
                                             reason=reason)
        self.calls.finish(call, outcome, True)

    def _translate(self, exc: BaseException | None, tb: Any) -> BaseException:
        if exc is None:
            self.counts["failed"] += 1
            return RuntimeError("the Dask task failed without an exception")
        if type(exc).__name__ == "KilledWorker":
            self.counts["crashed"] += 1
            crashed = WorkerCrashed(
                f"the Dask worker running this call died (after Dask's own retries): {exc}")
            crashed.__cause__ = exc
            return crashed
        self.counts["failed"] += 1
        if tb is not None:
            try:
                exc = exc.with_traceback(tb)
            except Exception:  # noqa: BLE001 - a traceback that cannot be attached is only lost detail
                pass
        return exc

    def _queue_gather(self, call: DaskCall) -> None:
        """Fetch *call*'s result now, or with the next ones while the cluster is saturated. Thread: loop.

        Why: each ``client.gather`` is a request to the scheduler, which fetches
        from the worker and answers: four messages in this process whatever the
        number of keys, and on a saturated cluster the worker holding the result
        is busy with its next task, whose thread must hand the GIL to the
        worker's event loop to serve the fetch. Measured with 64 calls of 50 ms
        on 2 workers, fetching every result as it finished stretched each task
        by 2-5 ms and cost ~1 ms of this process's CPU per call (the lane ran
        at 0.91x ``client.map`` with a resource; fetching at the end: 0.96x).

        So while at least one task per worker thread is still out besides the
        finished ones (the cluster is saturated: the call waited behind others
        anyway), a result waits for others: at most 10 % of the time its call
        has spent on the cluster and at most 100 ms (the first result of a batch
        sets the deadline), or until 64 are in. Otherwise (a cluster with room,
        a lone call) it is fetched at once.
        """
        self._to_gather.append(call)
        threads = self.lane.threads
        # Calls still queued or running on the cluster: neither waiting for a fetch nor being fetched.
        still_out = len(self.calls.inflight) - len(self._to_gather) - self._fetching
        wait = 0.0
        if threads > 0 and still_out >= threads and len(self._to_gather) < _GATHER_BATCH:
            wait = min(_GATHER_WINDOW, _GATHER_SHARE * (time.perf_counter() - call.submitted_at))
        if wait < 0.001:
            later, self._gather_later = self._gather_later, None
            if later is not None:
                later.cancel()
            if not self._gather_soon:
                self._gather_soon = True
                asyncio.get_running_loop().call_soon(self._start_gather)
        elif self._gather_later is None and not self._gather_soon:
            self._gather_later = asyncio.get_running_loop().call_later(wait, self._start_gather)

    def _start_gather(self) -> None:
        self._gather_soon = False
        later, self._gather_later = self._gather_later, None
        if later is not None:
            later.cancel()
        batch, self._to_gather = self._to_gather, []
        batch = [c for c in batch if not c.settled and c.future is not None]
        if batch:
            self._fetching += len(batch)
            asyncio.get_running_loop().create_task(self._gather(batch))

    async def _gather(self, batch: list[DaskCall]) -> None:
        """One ``client.gather`` for results that finished together; one by one if that fails. Thread: loop."""
        try:
            await self._gather_batch(batch)
        finally:
            self._fetching -= len(batch)

    async def _gather_batch(self, batch: list[DaskCall]) -> None:
        client = self.lane.client
        if client is None:
            for call in batch:
                self.calls.finish(call, self.lane.unavailable_error(), True)
            return
        try:
            values = await client.gather([c.future for c in batch])
        except BaseException:  # noqa: BLE001 - e.g. a result lost with its worker: fall back one by one
            if len(batch) == 1:
                await self._gather_one(batch[0])
                return
            for call in batch:
                await self._gather_one(call)
            return
        for call, value in zip(batch, values):
            if self.calls.finish(call, value, False):  # False: its pushed result came first
                self.counts["completed"] += 1

    async def _gather_one(self, call: DaskCall) -> None:
        future = call.future
        if future is None or call.settled:
            return
        try:
            value = await future
        except BaseException as exc:  # noqa: BLE001 - the outcome of this call
            if isinstance(exc, asyncio.CancelledError) and not future.cancelled():
                raise
            self.calls.finish(call, self._translate(exc, exc.__traceback__) if future.status == "error"
                              else self.lane.unavailable_error(), True)
            return
        if self.calls.finish(call, value, False):
            self.counts["completed"] += 1

    def on_pushed(self, event: Any) -> None:
        """A result pushed by a worker (see _dask_task.push_result): settle its call. Thread: loop.

        Dask's client calls this while reading the scheduler's stream, before
        the ``key-in-memory`` of the same task that follows it, so the call's
        watcher finds it settled and fetches nothing. Anything else on the topic
        (the scheduler logs its own events about this client there) is ignored.
        """
        try:
            _, (key, blob) = event
            call = self.calls.by_key.get(key)
        except (TypeError, ValueError):
            return
        if call is None or call.settled:
            return
        try:
            value = pickle.loads(blob)
        except Exception:  # noqa: BLE001 - the watcher fetches it with a gather
            return
        if self.calls.finish(call, value, False):
            self.counts["completed"] += 1
            self.counts["pushed"] += 1


def _cancel_reason(future: Any) -> str:
    exc = getattr(getattr(future, "_state", None), "exception", None)
    return str(getattr(exc, "reason", "") or "cancelled")
