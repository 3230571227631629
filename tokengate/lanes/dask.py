"""The Dask lane's engine room: one asynchronous ``distributed.Client`` per coordinator, on its loop.

:class:`DaskLane` owns the connection to a Dask scheduler (``dask_address``, or
the ``TOKENGATE_DASK_ADDRESS`` environment variable, or else an embedded
``LocalCluster`` it starts and closes itself) and moves calls between the
lane's routed worker threads (:mod:`tokengate.lanes.dask_worker`) and the
cluster:

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
  saturated cluster, they wait briefly for each other: see ``_queue_gather``);
  the awaiter is settled from the loop, where the result arrives (no thread hop
  either way). Settled calls' futures are released in batches (``_release_spent``).
* ``pure=False`` always (every call runs, side effects included); each task's
  key is ``<operation_type>-<token id>-<random>``, so it is readable on the Dask
  dashboard and unique across coordinators sharing a cluster.
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
import collections
import importlib.util
import logging
import os
import pickle
import threading
import time
import uuid
from typing import Any, Callable, Deque, Hashable, Mapping

from ..errors import ConfigurationError, WorkerCrashed, describe_exception
from ._dask_task import Payload, invoke
from .dask_errors import ClusterUnavailable, TaskCancelledOnCluster

__all__ = [
    "ADDRESS_ENV",
    "DaskCall",
    "DaskLane",
    "EXTRA_HINT",
    "distributed_available",
    "require_distributed",
    "rendezvous",
]

logger = logging.getLogger("tokengate.lanes")

#: The environment variable naming the scheduler when no ``dask_address`` is given.
ADDRESS_ENV = "TOKENGATE_DASK_ADDRESS"
#: How to install the lane's dependency.
EXTRA_HINT = "pip install 'tokengate[dask]'"
#: Calls in flight on the cluster per domain when ``dask_inflight`` is not given (slots are cheap: no thread).
DEFAULT_INFLIGHT = 64
#: Resources the embedded cluster declares on every worker (one task of each class per worker thread).
LOCAL_RESOURCES = {"heavy": 1, "medium": 1, "light": 1}
# Seconds between refreshes of the worker list (resources, pins) and connection checks.
_MONITOR_INTERVAL = 2.0
# Seconds between two attempts to reconnect after the client gave up.
_RECONNECT_INTERVAL = 2.0
# Seconds a settled call's Dask future is kept, at most, for its release to follow the next submission.
_RELEASE_DELAY = 0.005
# ... and while other calls of the lane are still on the cluster: their releases go out together
# (each batch of releases is a message batch to the scheduler and a free-keys batch that a busy
# worker's event loop must take the GIL from the running task to read).
_RELEASE_BUSY_DELAY = 0.5
# While the cluster is saturated, a finished call's result waits to be fetched with others: at most
# this share of the time the call has spent on the cluster, and at most _GATHER_WINDOW seconds ...
_GATHER_SHARE = 0.1
_GATHER_WINDOW = 0.1
# ... or until this many results are in (the size of one gather).
_GATHER_BATCH = 64
# Seconds aclose() gives the client and the embedded cluster to close.
_CLOSE_TIMEOUT = 15.0


def distributed_available() -> bool:
    """True if ``distributed`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("distributed") is not None
    except (ImportError, ValueError):
        return False


def require_distributed(what: str) -> None:
    """Raise ConfigurationError naming the extra to install when ``distributed`` is missing."""
    if not distributed_available():
        raise ConfigurationError(
            f"{what} needs Dask distributed, which is not installed; install the extra: {EXTRA_HINT}")


def rendezvous(key: Hashable, candidates: list[str]) -> str:
    """The candidate *key* is pinned to: highest ``hash((key, candidate))`` (stable while it stays)."""
    return max(candidates, key=lambda address: hash((key, address)))


class DaskCall:
    """One call on its way to the cluster and back; the outcome is set exactly once (see DaskLane._finish)."""

    __slots__ = ("payload", "weight", "affinity", "key", "future", "settled", "value", "is_error", "cancelled",
                 "submitted_at", "token", "slot")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any] | None,
                 weight: str, affinity: Hashable | None, key: str, token: Any = None, slot: Any = None) -> None:
        self.payload: Payload | None = Payload(func, args, kwargs, key)
        # The token this call settles: its outcome goes to the coordinator from
        # where it arrives (the loop).
        self.token: Any = token
        # What is told when the outcome is set (``slot.call_done(call)``, on the loop): the DaskWorker.
        self.slot: Any = slot
        self.weight = weight
        self.affinity = affinity
        self.key = key
        self.future: Any = None  # the distributed.Future, set on the loop
        self.settled = False  # the outcome is set; guarded by DaskLane._lock
        self.value: Any = None
        self.is_error = False
        self.cancelled = False
        self.submitted_at = 0.0


def task_key(operation_type: str, token_id: str) -> str:
    """A Dask key for a call: readable on the dashboard, unique across coordinators sharing a cluster."""
    return f"{operation_type}-{token_id}-{uuid.uuid4().hex[:12]}"


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

    Threads: :meth:`run` and :meth:`cancel` from any thread; everything that
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._outbox: Deque[DaskCall] = collections.deque()
        self._flush_scheduled = False
        self._inflight: set[DaskCall] = set()  # submitted, outcome not back; guarded by _lock
        self._by_key: dict[str, DaskCall] = {}  # the same calls by Dask key (pushed results); guarded by _lock
        self._topic: str | None = None  # the event topic small results are pushed on (this client's id)
        self._spent: list[Any] = []  # Dask futures of settled calls, not released yet; guarded by _lock
        self._release_due: float | None = None  # loop time of the next armed release; guarded by _lock
        self._to_gather: list[DaskCall] = []  # finished on the cluster, result not fetched yet (loop only)
        self._gather_soon = False  # a _start_gather is scheduled with call_soon (loop only)
        self._gather_later: asyncio.TimerHandle | None = None  # ... or waits for more results (loop only)
        self._threads = 0  # worker threads in the cluster (refreshed with the worker list)
        self._fetching = 0  # calls in a client.gather under way (finished on the cluster; loop only)
        self._connect_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._last_attempt = 0.0
        self._workers: dict[str, dict[str, Any]] = {}
        self._placements: dict[str, tuple[list[str], str | None]] = {}  # per weight class (loop only)
        self.counts = {"submitted": 0, "completed": 0, "pushed": 0, "failed": 0, "crashed": 0, "cancelled": 0,
                       "refused_unavailable": 0, "refused_at_submit": 0, "lost": 0, "connects": 0, "reconnects": 0}

    # -- lifecycle -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin connecting (once) on *loop*. Thread: any."""
        with self._lock:
            if self.state != "new":
                return
            self._loop = loop
            self.state = "connecting"
        if _on_loop(loop):
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
            self._topic = str(client.id)
            client.subscribe_topic(self._topic, self._on_pushed)
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
            if self._outbox:  # calls sent while connecting: submit them now, or fail them
                self._schedule_flush()

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
            if self._topic is not None:
                # The scheduler may be a new one, which knows no subscription (Dask's client does
                # not send them again): without it every result would be fetched with a gather.
                try:
                    client.subscribe_topic(self._topic, self._on_pushed)
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
                self._spawn(_close_quietly(client))
            self._begin_connect()

    async def _refresh_workers(self) -> None:
        info = await self.client.scheduler.identity(n_workers=-1)
        workers = info.get("workers", {})
        self._placements = {}  # the worker list changed: recompute each class's placement
        self._threads = sum(int(w.get("nthreads") or 0) for w in workers.values())
        self._workers = {
            address: {"name": str(w.get("name", "")), "nthreads": w.get("nthreads"),
                      "resources": dict(w.get("resources") or {}), "memory_limit": w.get("memory_limit")}
            for address, w in workers.items()}

    def _spawn(self, coro: Any) -> None:
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
        with self._lock:
            leftover = list(self._outbox) + list(self._inflight)
            self._outbox.clear()
        for call in leftover:
            self._finish(call, ClusterUnavailable(f"the Dask lane of coordinator {self.name!r} closed",
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
        """Queue *call* for the cluster; its outcome comes back through ``_finish``. Thread: loop.

        While the first connection is under way the call waits for it (in the
        outbox); without a connection it fails at once with ClusterUnavailable
        (and a reconnect is scheduled when due).
        """
        state = self.state
        if state != "connected" and state not in ("connecting", "new"):
            self.counts["refused_unavailable"] += 1
            if state == "unavailable":
                self.check_connection()
            self._finish(call, self._unavailable(), True)
            return
        self._outbox.append(call)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Thread: loop (the outbox and this flag are the loop's)."""
        self._flush_scheduled = True
        loop = self._loop
        if loop is None:
            return
        loop.call_soon(self._flush)

    def unavailable_reason(self) -> str:
        """Why the lane cannot take calls now, in words. Thread: any."""
        return (f"the Dask lane of coordinator {self.name!r} has no connection to {self._where()}"
                + (f": {self.error}" if self.error else f" ({self.state})"))

    def _unavailable(self) -> ClusterUnavailable:
        return ClusterUnavailable(self.unavailable_reason(), address=self.address, reason=self.state)

    def cancel(self, call: DaskCall, reason: str, outcome: BaseException) -> bool:
        """Stop waiting for *call* and cancel its task on the cluster; False if its outcome was already set.

        Thread: any. A task that has not started on a worker never runs; one
        already running keeps its Dask worker thread until the function
        returns, and its result is dropped (Dask cannot interrupt a thread).
        """
        with self._lock:
            if call.settled:
                return False
            call.cancelled = True
            future = call.future  # _finish drops it; None: not submitted yet (_submit then cancels it)
        if not self._finish(call, outcome, True):
            return False
        loop = self._loop
        if loop is not None and future is not None:
            try:
                loop.call_soon_threadsafe(self._cancel_on_cluster, future, reason)
            except RuntimeError:  # loop closed: the client is gone with it
                pass
        return True

    def _cancel_on_cluster(self, future: Any, reason: str) -> None:
        """Thread: loop."""
        if self.client is not None and self.state != "closed":
            self.counts["cancelled"] += 1
            self._spawn(_cancel_quietly(self.client, future, reason))

    def _finish(self, call: DaskCall, value: Any, is_error: bool) -> bool:
        """Set *call*'s outcome once, hand its token to the coordinator, free its slot.

        False if the outcome was already set. Thread: any (mostly the loop; the
        slot is always told on the loop).
        """
        with self._lock:
            if call.settled:
                return False
            call.settled = True
            call.value = value
            call.is_error = is_error
            call.payload = None
            # The Dask future is released with the next submission (see _release_spent).
            future, call.future = call.future, None
            self._inflight.discard(call)
            self._by_key.pop(call.key, None)
            loop = self._loop
            release_at = None
            if future is not None and loop is not None:
                self._spent.append(future)
                release_at = loop.time() + (_RELEASE_BUSY_DELAY if self._inflight else _RELEASE_DELAY)
                due = self._release_due
                if due is not None and due <= release_at:
                    release_at = None  # an armed release comes first and takes this one too
                else:
                    self._release_due = release_at
            token, call.token = call.token, None
        del future
        on_loop = loop is not None and _on_loop(loop)
        if release_at is not None and loop is not None:
            # A release armed later stays armed: whichever fires first drops everything spent.
            try:
                if on_loop:
                    loop.call_at(release_at, self._release_spent)
                else:
                    loop.call_soon_threadsafe(loop.call_at, release_at, self._release_spent)
            except RuntimeError:  # loop closed: the client went with it
                pass
        if token is not None:
            token.finished_at = time.perf_counter()
            token._run_outcome = value
            token._run_error = is_error
            token._coordinator._complete(token)
        slot = call.slot
        if slot is not None:
            if on_loop or loop is None:
                slot.call_done(call)
            else:
                try:
                    loop.call_soon_threadsafe(slot.call_done, call)
                except RuntimeError:  # loop closed: nothing runs on this lane any more
                    pass
        return True

    def _release_spent(self) -> None:
        """Drop the Dask futures of settled calls, so the client releases their keys. Thread: loop.

        Why not at once: Dask batches what a client sends (10 ms) and what the
        scheduler sends a worker (5 ms), and a message sent while the stream is
        idle goes at once but opens a window the next one must wait out. A
        release sent alone just before the awaiter's next call made that call
        wait a window (round trips 1.4-1.6x raw ``client.submit``). Dropped
        by the next submission (see _flush), the release travels with it.
        While other calls are on the cluster (and no submission comes to carry
        them), releases wait up to 500 ms for each other: one batch for many
        calls instead of a message batch to the scheduler and a ``free-keys``
        batch to a busy worker per call (64 calls of 50 ms on 2 workers: 100
        ms batches left the lane at ~0.96x ``client.map``, 500 ms at ~1.02x).
        When the lane's last call settles, what is spent goes 5 ms later.
        """
        with self._lock:
            spent, self._spent = self._spent, []
            self._release_due = None
        del spent  # each Future's __del__ schedules its key's release on the loop

    def _flush(self) -> None:
        """Submit every queued call: one ``client.map`` per (resource, pinned worker) group. Thread: loop."""
        self._flush_scheduled = False
        if self.state in ("connecting", "new"):
            return  # the connection attempt's end flushes them (see _connect)
        batch = list(self._outbox)
        self._outbox.clear()
        client = self.client
        if self.state != "connected" or client is None or client.status != "running":
            self.check_connection()
            for call in batch:
                self.counts["refused_unavailable"] += 1
                self._finish(call, self._unavailable(), True)
            return
        groups: dict[tuple[str | None, str | None], list[DaskCall]] = {}
        for call in batch:
            if call.cancelled:
                continue
            candidates, resource = self._placement(call.weight)
            pinned = None if call.affinity is None or not candidates else rendezvous(call.affinity, candidates)
            groups.setdefault((resource, pinned), []).append(call)
        if self._spent:
            # Before the submission: each release is a loop callback (Future.__del__), so it runs
            # after client.map has put the new tasks in the client's buffer: one message.
            self._release_spent()
        for (resource, pinned), calls in groups.items():
            self._submit(client, calls, resource, pinned)

    def _placement(self, weight: str) -> tuple[list[str], str | None]:
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

    def _submit(self, client: Any, calls: list[DaskCall], resource: str | None, pinned: str | None) -> None:
        options: dict[str, Any] = {"pure": False}
        if resource is not None:
            options["resources"] = {resource: 1}
        if pinned is not None:
            options["workers"] = [pinned]
            options["allow_other_workers"] = True  # the documented fallback when the pinned worker left
        topic = self._topic
        payloads = []
        for call in calls:
            payload = call.payload
            if payload is not None:
                payload.topic = topic
            payloads.append(payload)
        try:
            futures = client.map(invoke, payloads, key=[c.key for c in calls], **options)
        except Exception as exc:  # noqa: BLE001 - typically a payload that does not pickle
            if len(calls) > 1:  # find the culprit: only its call fails
                for call in calls:
                    self._submit(client, [call], resource, pinned)
                return
            self.counts["failed"] += 1
            self._finish(calls[0], exc, True)
            return
        now = time.perf_counter()
        loop = asyncio.get_running_loop()
        for call, future in zip(calls, futures):
            call.submitted_at = now
            with self._lock:
                if call.settled:  # cancelled meanwhile: cancel its task too
                    self._spawn(_cancel_quietly(client, future, "cancelled"))
                    continue
                call.future = future
                self._inflight.add(call)
                self._by_key[call.key] = call
            self.counts["submitted"] += 1
            loop.create_task(self._watch(call, future))

    async def _watch(self, call: DaskCall, future: Any) -> None:
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
            self._finish(call, self._translate(exc, tb), True)
            return
        # cancelled: by a lost connection, or by someone else
        reason = _cancel_reason(future)
        client = self.client
        # Lost with the connection: Dask says so in the reason, or its client is no longer running
        # (a scheduler closing may cancel futures with another reason before the client notices).
        if "connection" in reason or client is None or client.status != "running":
            self.counts["lost"] += 1
            outcome: BaseException = ClusterUnavailable(
                f"the connection to the Dask scheduler was lost while task {call.key} was on the cluster "
                "(it may have run partly)", address=self.address, reason="connection lost")
            self.check_connection()
        else:
            outcome = TaskCancelledOnCluster(f"task {call.key} was cancelled on the Dask cluster: {reason}",
                                             reason=reason)
        self._finish(call, outcome, True)

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
        threads = self._threads
        # Calls still queued or running on the cluster: neither waiting for a fetch nor being fetched.
        still_out = len(self._inflight) - len(self._to_gather) - self._fetching
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
        client = self.client
        if client is None:
            for call in batch:
                self._finish(call, self._unavailable(), True)
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
            if self._finish(call, value, False):  # False: its pushed result came first
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
            self._finish(call, self._translate(exc, exc.__traceback__) if future.status == "error"
                         else self._unavailable(), True)
            return
        if self._finish(call, value, False):
            self.counts["completed"] += 1

    def _on_pushed(self, event: Any) -> None:
        """A result pushed by a worker (see _dask_task.push_result): settle its call. Thread: loop.

        Dask's client calls this while reading the scheduler's stream, before
        the ``key-in-memory`` of the same task that follows it, so the call's
        watcher finds it settled and fetches nothing. Anything else on the topic
        (the scheduler logs its own events about this client there) is ignored.
        """
        try:
            _, (key, blob) = event
            call = self._by_key.get(key)
        except (TypeError, ValueError):
            return
        if call is None or call.settled:
            return
        try:
            value = pickle.loads(blob)
        except Exception:  # noqa: BLE001 - the watcher fetches it with a gather
            return
        if self._finish(call, value, False):
            self.counts["completed"] += 1
            self.counts["pushed"] += 1

    # -- statistics ----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The cluster as ``stats()["lanes"]["dask"]["cluster"]`` shows it. Thread: any."""
        with self._lock:
            inflight = list(self._inflight)
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


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _dashboard_link(client: Any) -> str | None:
    try:
        info = client.scheduler_info()
        if "dashboard" in info.get("services", {}):
            return str(client.dashboard_link)
    except Exception:  # noqa: BLE001 - no dashboard is an answer
        pass
    return None


def _cancel_reason(future: Any) -> str:
    exc = getattr(getattr(future, "_state", None), "exception", None)
    return str(getattr(exc, "reason", "") or "cancelled")


async def _cancel_quietly(client: Any, future: Any, reason: str) -> None:
    try:
        await client.cancel([future], reason=reason)
    except Exception as exc:  # noqa: BLE001 - the connection may be gone; the task then goes with it
        logger.debug("cancelling a Dask task failed: %s", exc)


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


def address_from(option: str | None) -> str | None:
    """The scheduler address: the option, else ``TOKENGATE_DASK_ADDRESS``, else None (embedded cluster).

    Raises:
        ConfigurationError: an address that is not a non-empty string.
    """
    if option is None:
        option = os.environ.get(ADDRESS_ENV) or None
    if option is not None and (not isinstance(option, str) or not option.strip()):
        raise ConfigurationError(f"dask_address must be a scheduler address like 'tcp://host:8786', got {option!r}")
    return None if option is None else option.strip()
