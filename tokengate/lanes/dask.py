"""The Dask lane: one asynchronous ``distributed.Client`` per coordinator, on its loop, and its lifecycle.

:class:`DaskLane` owns the connection to a Dask scheduler (``dask_address``, or
the ``TOKENGATE_DASK_ADDRESS`` environment variable, or else an embedded
``LocalCluster`` it starts and closes itself): it connects, watches the
connection, reconnects after a loss (subscribing again to pushed results),
refreshes the worker list and describes the cluster. The coordinator builds
one per Dask lane, starts, awaits and closes it; the lane's routed slots
(:mod:`tokengate.lanes.dask_worker`) send it their calls. The calls
themselves move through two parts the lane owns: ``lane.calls``
(:mod:`tokengate.lanes.dask_calls`: submission per burst, cancellation,
settlement) and ``lane.results`` (:mod:`tokengate.lanes.dask_results`: pushed
results, batched gathers, errors).

* Each routed :class:`~tokengate.lanes.dask_worker.DaskWorker` is a slot of one
  call in flight on the cluster, driven by the coordinator's loop (no thread):
  it claims a token, hands the call to :meth:`DaskLane.send` and takes its next
  token when the outcome is back. So the lane's slots per domain *are* the
  bound on calls in flight on the cluster per weight class; everything else
  waits in TokenGate's pending queues, where kill, pause and drain reach it.
* Calls are submitted on the coordinator's loop, **batched per burst**: the
  first call of a burst schedules one flush, which submits everything queued
  by then with one ``client.map`` per (resource, pinned worker) group. A small
  result comes back as a Dask event with its task's end (see :mod:`tokengate.lanes._dask_task`);
  others, finishing together, are fetched with one ``client.gather`` (on a
  saturated cluster, they wait briefly for each other: see ``DaskResults._queue_gather``);
  the awaiter is settled from the loop, where the result arrives (no thread hop
  either way). Settled calls' futures are released in batches (``DaskCalls._release_spent``).
* **Weight classes map to resources**: a heavy call asks for the Dask resource
  ``heavy=1`` when at least one worker declares it (``dask worker --resources
  "heavy=1"``), and runs on any worker when none does. The embedded cluster
  declares ``heavy``, ``medium`` and ``light`` on every worker.
* **Locality**: a call pinned by the sticky policy (its key) or the conductor
  (its chain) goes to one Dask worker chosen by rendezvous hashing over the
  workers that may run its class, with ``allow_other_workers=True``: while that
  worker is in the cluster every call of the key runs there; when it leaves,
  Dask runs the call anywhere and the key moves to the next worker of its hash
  order (only that worker's keys move).

What the outcome of a call can be, besides the function's value:

* the function's own exception, unchanged in type, with the remote traceback
  (as ``distributed`` gives it);
* :class:`~tokengate.errors.WorkerCrashed` when Dask gives up on the task after
  its workers died (``KilledWorker``, after Dask's own retries:
  ``distributed.scheduler.allowed-failures``, default 3);
* :class:`~tokengate.lanes.dask_errors.ClusterUnavailable` (503) when there is
  no connection to the scheduler, or it was lost while the call was out;
* :class:`~tokengate.lanes.dask_errors.TaskCancelledOnCluster` when someone
  else cancelled the task.

Nothing here logs on the call path; connects, losses, reconnects and closes are
logged on ``tokengate.lanes``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ..errors import describe_exception
from .dask_calls import DaskCall, DaskCalls, on_loop
from .dask_config import LOCAL_RESOURCES
from .dask_errors import ClusterUnavailable
from .dask_results import DaskResults

__all__ = ["DaskLane"]

logger = logging.getLogger("tokengate.lanes")

# Seconds between refreshes of the worker list (resources, pins) and connection checks.
_MONITOR_INTERVAL = 2.0
# Seconds between two attempts to reconnect after the client gave up.
_RECONNECT_INTERVAL = 2.0
# Seconds aclose() gives the client and the embedded cluster to close.
_CLOSE_TIMEOUT = 15.0


class DaskLane:
    """The connection to one Dask scheduler and the calls on it (see the module docstring).

    Args:
        name: the coordinator's name (logs, the client's name).
        address: the scheduler's address; None for an embedded ``LocalCluster``.
        local_workers: worker processes of the embedded cluster (one thread each).
        optional: an unreachable scheduler at a warm start does not fail the
            start; the lane refuses calls with ``ClusterUnavailable`` until it
            connects, and ``ready`` does not wait for it.
        warm: connect when the coordinator starts (else at the first Dask call).

    Threads: :meth:`start` and :meth:`cancel` from any thread; everything that
    touches the client runs on the coordinator's loop.
    """

    def __init__(self, *, name: str, address: str | None, local_workers: int, optional: bool, warm: bool) -> None:
        self.name = name
        self.configured_address = address
        self.local_workers = local_workers
        self.optional = optional
        self.warm = warm
        #: new | connecting | connected | unavailable | closed
        self.state = "new"
        self.error: str | None = None
        self.address: str | None = address
        self.client: Any = None
        self.cluster: Any = None
        self.dashboard_link: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # makes start() begin once, from any thread
        self.topic: str | None = None  # the event topic small results are pushed on (this client's id)
        self.threads = 0  # worker threads in the cluster (refreshed with the worker list)
        self._connect_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._last_attempt = 0.0
        self._workers: dict[str, dict[str, Any]] = {}
        self._placements: dict[str, tuple[list[str], str | None]] = {}  # per weight class (loop only)
        self.counts = {"submitted": 0, "completed": 0, "pushed": 0, "failed": 0, "crashed": 0, "cancelled": 0,
                       "refused_unavailable": 0, "refused_at_submit": 0, "lost": 0, "connects": 0, "reconnects": 0}
        self.calls = DaskCalls(self)  # the calls on their way out, and their settlement
        self.results = DaskResults(self)  # how their outcomes come back

    # -- lifecycle -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin connecting (once) on *loop*. Thread: any."""
        with self._lock:
            if self.state != "new":
                return
            self.loop = loop
            self.state = "connecting"
        if on_loop(loop):
            self._begin_connect()
        else:
            loop.call_soon_threadsafe(self._begin_connect)

    def _begin_connect(self) -> None:
        """Thread: loop."""
        if self.state in ("closed", "connected") or (self._connect_task is not None and not self._connect_task.done()):
            return
        self._last_attempt = time.monotonic()
        self._connect_task = asyncio.get_running_loop().create_task(self._connect())

    async def wait_started(self) -> None:
        """Wait for the first connection attempt; raise its error unless the lane is optional. Thread: loop.

        Raises:
            ClusterUnavailable: the scheduler could not be reached (or the
                embedded cluster could not start) and the lane is required.
        """
        if self._connect_task is None:  # start() was called from a worker thread: its callback may not have run
            self._begin_connect()
        task = self._connect_task
        if task is not None:
            await asyncio.shield(task)
        if self.state != "connected" and not self.optional:
            raise ClusterUnavailable(
                f"the Dask lane of coordinator {self.name!r} could not connect to "
                f"{self._where()}: {self.error}", address=self.address, reason="unreachable at start")

    async def _connect(self) -> None:
        """Connect the client (starting the embedded cluster first if there is no address). Thread: loop."""
        try:
            from distributed import Client, LocalCluster

            reconnect = self.counts["connects"] > 0
            if self.configured_address is None and self.cluster is None:
                self.cluster = await LocalCluster(
                    n_workers=self.local_workers, threads_per_worker=1, processes=True, asynchronous=True,
                    host="127.0.0.1", dashboard_address="127.0.0.1:0",  # its HTTP server: loopback, a free port
                    resources=dict(LOCAL_RESOURCES), name=f"{self.name}-dask")  # type: ignore[no-untyped-call]
            address = self.configured_address or self.cluster.scheduler_address
            self.address = address
            client = await Client(address, asynchronous=True, name=f"tokengate-{self.name}",
                                  set_as_default=False)  # type: ignore[no-untyped-call]
            if self.state == "closed":  # closed while connecting
                await client.close()
                return
            self.client = client
            # Small results come back as events on the topic named by this client's id (the
            # scheduler drops that topic's log some time after the client leaves). Subscribed
            # before any submission: both travel on the client's one stream to the scheduler.
            self.topic = str(client.id)
            client.subscribe_topic(self.topic, self.results.on_pushed)
            self.dashboard_link = _dashboard_link(client)
            self.error = None
            await self._refresh_workers()
            self.state = "connected"
            self.counts["connects"] += 1
            if reconnect:
                self.counts["reconnects"] += 1
            logger.info("coordinator %s: Dask lane %s %s (%d workers)", self.name,
                        "reconnected to" if reconnect else "connected to", self._where(), len(self._workers))
            if self._monitor_task is None:
                self._monitor_task = asyncio.get_running_loop().create_task(self._monitor())
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the lane's state, not a crash
            self.error = describe_exception(exc)
            if self.state != "closed":
                self.state = "unavailable"
            logger.error("coordinator %s: Dask lane cannot reach %s: %s", self.name, self._where(), self.error)
        finally:
            self.calls.flush_waiting()  # calls sent while connecting: submit them now, or fail them

    def _where(self) -> str:
        if self.configured_address is None:
            return "its embedded LocalCluster" + (f" at {self.address}" if self.address else "")
        return f"the scheduler at {self.configured_address}"

    async def _monitor(self) -> None:
        """Refresh the worker list; notice a lost connection and reconnect. Thread: loop."""
        while self.state != "closed":
            await asyncio.sleep(_MONITOR_INTERVAL)
            self.check_connection()
            if self.state == "connected":
                try:
                    await self._refresh_workers()
                except Exception as exc:  # noqa: BLE001 - a failed refresh keeps the old list
                    logger.debug("Dask lane %s: refreshing workers failed: %s", self.name, exc)

    def check_connection(self) -> None:
        """Move to ``unavailable`` if the client lost its scheduler; start a reconnect when due. Thread: loop."""
        client = self.client
        if self.state == "connected" and (client is None or client.status != "running"):
            self.state = "unavailable"
            self.error = f"lost the connection to the scheduler (client {getattr(client, 'status', None)})"
            logger.error("coordinator %s: Dask lane %s", self.name, self.error)
        if self.state != "unavailable":
            return
        if client is not None and client.status == "running":  # Dask's own reconnect succeeded
            self.state = "connected"
            self.error = None
            if self.topic is not None:
                # The scheduler may be a new one, which knows no subscription (Dask's client does
                # not send them again): without it every result would be fetched with a gather.
                try:
                    client.subscribe_topic(self.topic, self.results.on_pushed)
                except Exception as exc:  # noqa: BLE001 - results are then fetched; never a lost call
                    logger.debug("Dask lane %s: subscribing to results failed: %s", self.name, exc)
            self.counts["reconnects"] += 1
            logger.warning("coordinator %s: Dask lane reconnected to %s", self.name, self._where())
            return
        if client is not None and client.status == "connecting":
            return  # Dask is retrying by itself
        if time.monotonic() - self._last_attempt >= _RECONNECT_INTERVAL:
            if client is not None:
                self.client = None
                self.spawn(_close_quietly(client))
            self._begin_connect()

    async def _refresh_workers(self) -> None:
        info = await self.client.scheduler.identity(n_workers=-1)
        workers = info.get("workers", {})
        self._placements = {}  # the worker list changed: recompute each class's placement
        self.threads = sum(int(w.get("nthreads") or 0) for w in workers.values())
        self._workers = {
            address: {"name": str(w.get("name", "")), "nthreads": w.get("nthreads"),
                      "resources": dict(w.get("resources") or {}), "memory_limit": w.get("memory_limit")}
            for address, w in workers.items()}

    def spawn(self, coro: Any) -> None:
        """Run *coro* as one of the lane's background tasks (``aclose`` cancels those left). Thread: loop."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Fail what is still out, close the client and the embedded cluster (its processes end). Thread: loop.

        Idempotent. Bounded: each close gets at most 15 s; a failure is logged.
        """
        if self.state == "closed":
            return
        was = self.state
        self.state = "closed"
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._connect_task), _CLOSE_TIMEOUT)
            except Exception:  # noqa: BLE001 - it logged its own failure
                pass
        leftover = self.calls.take_unsettled()
        for call in leftover:
            self.calls.finish(call, ClusterUnavailable(f"the Dask lane of coordinator {self.name!r} closed",
                                                       address=self.address, reason="closed"), True)
        for task in list(self._background):
            task.cancel()
        client, cluster = self.client, self.cluster
        self.client = self.cluster = None
        if client is not None:
            await _close_quietly(client)
        if cluster is not None:
            try:
                await asyncio.wait_for(cluster.close(), _CLOSE_TIMEOUT)
            except Exception:  # noqa: BLE001 - logged; the stop goes on
                logger.exception("coordinator %s: closing the embedded Dask cluster failed", self.name)
        if was != "new":
            logger.info("coordinator %s: Dask lane closed", self.name)

    @property
    def ready(self) -> bool:
        """True when calls can go to the cluster, or the lane does not hold readiness back.

        An optional lane, and a lane that starts at first use and was not used
        yet, never hold readiness back.
        """
        state = self.state
        return state == "connected" or self.optional or (state == "new" and not self.warm)

    # -- calls ---------------------------------------------------------------

    def send(self, call: DaskCall) -> None:
        """Queue *call* for the cluster (see :meth:`DaskCalls.send`). Thread: loop."""
        self.calls.send(call)

    def cancel(self, call: DaskCall, reason: str, outcome: BaseException) -> bool:
        """Stop waiting for *call* and cancel its task on the cluster (see :meth:`DaskCalls.cancel`). Thread: any."""
        return self.calls.cancel(call, reason, outcome)

    def unavailable_reason(self) -> str:
        """Why the lane cannot take calls now, in words. Thread: any."""
        return (f"the Dask lane of coordinator {self.name!r} has no connection to {self._where()}"
                + (f": {self.error}" if self.error else f" ({self.state})"))

    def unavailable_error(self) -> ClusterUnavailable:
        """The outcome of a call the lane cannot take now (see :meth:`unavailable_reason`)."""
        return ClusterUnavailable(self.unavailable_reason(), address=self.address, reason=self.state)

    def placement(self, weight: str) -> tuple[list[str], str | None]:
        """Workers a class may use, and the resource to ask for (None when no worker declares it).

        Computed once per worker-list refresh, not per call. Thread: loop.
        """
        cached = self._placements.get(weight)
        if cached is not None:
            return cached
        declaring = [a for a, w in self._workers.items() if w["resources"].get(weight, 0) > 0]
        placement = (sorted(declaring), weight) if declaring else (sorted(self._workers), None)
        self._placements[weight] = placement
        return placement

    # -- statistics ----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The cluster as ``stats()["lanes"]["dask"]["cluster"]`` shows it. Thread: any."""
        inflight = self.calls.inflight_calls()
        by_class = {w: 0 for w in LOCAL_RESOURCES}
        for call in inflight:
            by_class[call.weight] = by_class.get(call.weight, 0) + 1
        return {
            "state": self.state,
            "required": not self.optional,
            "embedded": self.configured_address is None,
            "scheduler_address": self.address,
            "dashboard_link": self.dashboard_link,
            "error": self.error,
            "workers": [{"address": a, **w} for a, w in sorted(self._workers.items())],
            "inflight": len(inflight),
            "inflight_by_class": by_class,
            **self.counts,
        }


def _dashboard_link(client: Any) -> str | None:
    try:
        info = client.scheduler_info()
        if "dashboard" in info.get("services", {}):
            return str(client.dashboard_link)
    except Exception:  # noqa: BLE001 - no dashboard is an answer
        pass
    return None


async def _close_quietly(client: Any) -> None:
    try:
        # Leave the result topic first: the scheduler logs this client's departure on it and
        # would try to send that event to the closed stream (a CRITICAL log line).
        client.unsubscribe_topic(str(client.id))
    except Exception:  # noqa: BLE001 - never subscribed (connect failed) or the stream is gone
        pass
    try:
        await asyncio.wait_for(client.close(), _CLOSE_TIMEOUT)
    except Exception:  # noqa: BLE001 - logged; the stop goes on
        logger.exception("closing the Dask client failed")
