"""The Dask lane's calls on their way to the cluster: submission per burst, cancellation, settlement.

:class:`DaskCalls` is the half of a :class:`~tokengate.lanes.dask.DaskLane`
that moves calls out (the lane owns one, as ``lane.calls``, and forwards its
``send`` and ``cancel`` to it); how each outcome comes back is
:mod:`tokengate.lanes.dask_results`. The routed slots
(:mod:`tokengate.lanes.dask_worker`) build a :class:`DaskCall` per claimed
token (with :func:`task_key`) and hand it to ``DaskLane.send``.

* Calls are submitted on the coordinator's loop, **batched per burst**: the
  first call of a burst schedules one flush, which submits everything queued
  by then with one ``client.map`` per (resource, pinned worker) group; a call
  pinned by an affinity goes to the worker :func:`rendezvous` names.
* ``pure=False`` always (every call runs, side effects included); each task's
  key is ``<operation_type>-<token id>-<random>``, so it is readable on the Dask
  dashboard and unique across coordinators sharing a cluster.
* :meth:`DaskCalls.finish` sets a call's outcome exactly once, whoever gets
  there first (the result, a kill or timeout, a lost connection), settles its
  token from the loop and frees its slot; settled calls' futures are released
  in batches (``_release_spent``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Deque, Hashable, Mapping

from ._dask_task import Payload, invoke

if TYPE_CHECKING:
    from .dask import DaskLane

__all__ = ["DaskCall", "DaskCalls", "on_loop", "rendezvous", "task_key"]

logger = logging.getLogger("tokengate.lanes")

# Seconds a settled call's Dask future is kept, at most, for its release to follow the next submission.
_RELEASE_DELAY = 0.005
# ... and while other calls of the lane are still on the cluster: their releases go out together
# (each batch of releases is a message batch to the scheduler and a free-keys batch that a busy
# worker's event loop must take the GIL from the running task to read).
_RELEASE_BUSY_DELAY = 0.5


def rendezvous(key: Hashable, candidates: list[str]) -> str:
    """The candidate *key* is pinned to: highest ``hash((key, candidate))`` (stable while it stays)."""
    return max(candidates, key=lambda address: hash((key, address)))


class DaskCall:
    """One call on its way to the cluster and back; the outcome is set exactly once (see DaskCalls.finish)."""

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
        self.settled = False  # the outcome is set; guarded by DaskCalls._lock
        self.value: Any = None
        self.is_error = False
        self.cancelled = False
        self.submitted_at = 0.0


def task_key(operation_type: str, token_id: str) -> str:
    """A Dask key for a call: readable on the dashboard, unique across coordinators sharing a cluster."""
    return f"{operation_type}-{token_id}-{uuid.uuid4().hex[:12]}"


class DaskCalls:
    """The calls of one :class:`~tokengate.lanes.dask.DaskLane` between ``send`` and their outcome.

    Reads the connection from *lane* (its state, client, result topic, worker
    placements) and hands each submitted future to ``lane.results`` to watch.
    Threads: :meth:`cancel`, :meth:`finish` and :meth:`inflight_calls` from
    any thread; everything else on the coordinator's loop.
    """

    def __init__(self, lane: DaskLane) -> None:
        self.lane = lane
        self.counts = lane.counts  # the lane's counters (the same dict)
        self._lock = threading.Lock()
        self._outbox: Deque[DaskCall] = collections.deque()
        self._flush_scheduled = False
        self.inflight: set[DaskCall] = set()  # submitted, outcome not back; guarded by _lock
        self.by_key: dict[str, DaskCall] = {}  # the same calls by Dask key (pushed results); guarded by _lock
        self._spent: list[Any] = []  # Dask futures of settled calls, not released yet; guarded by _lock
        self._release_due: float | None = None  # loop time of the next armed release; guarded by _lock

    def send(self, call: DaskCall) -> None:
        """Queue *call* for the cluster; its outcome comes back through ``finish``. Thread: loop.

        While the first connection is under way the call waits for it (in the
        outbox); without a connection it fails at once with ClusterUnavailable
        (and a reconnect is scheduled when due).
        """
        lane = self.lane
        state = lane.state
        if state != "connected" and state not in ("connecting", "new"):
            self.counts["refused_unavailable"] += 1
            if state == "unavailable":
                lane.check_connection()
            self.finish(call, lane.unavailable_error(), True)
            return
        self._outbox.append(call)
        if not self._flush_scheduled:
            self._schedule_flush()

    def flush_waiting(self) -> None:
        """Submit the calls sent while the lane was connecting, or fail them (the attempt is over). Thread: loop."""
        if self._outbox:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Thread: loop (the outbox and this flag are the loop's)."""
        self._flush_scheduled = True
        loop = self.lane.loop
        if loop is None:
            return
        loop.call_soon(self._flush)

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
            future = call.future  # finish drops it; None: not submitted yet (_submit then cancels it)
        if not self.finish(call, outcome, True):
            return False
        loop = self.lane.loop
        if loop is not None and future is not None:
            try:
                loop.call_soon_threadsafe(self._cancel_on_cluster, future, reason)
            except RuntimeError:  # loop closed: the client is gone with it
                pass
        return True

    def _cancel_on_cluster(self, future: Any, reason: str) -> None:
        """Thread: loop."""
        lane = self.lane
        if lane.client is not None and lane.state != "closed":
            self.counts["cancelled"] += 1
            lane.spawn(_cancel_quietly(lane.client, future, reason))

    def finish(self, call: DaskCall, value: Any, is_error: bool) -> bool:
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
            self.inflight.discard(call)
            self.by_key.pop(call.key, None)
            loop = self.lane.loop
            release_at = None
            if future is not None and loop is not None:
                self._spent.append(future)
                release_at = loop.time() + (_RELEASE_BUSY_DELAY if self.inflight else _RELEASE_DELAY)
                due = self._release_due
                if due is not None and due <= release_at:
                    release_at = None  # an armed release comes first and takes this one too
                else:
                    self._release_due = release_at
            token, call.token = call.token, None
        del future
        on_loop_now = loop is not None and on_loop(loop)
        if release_at is not None and loop is not None:
            # A release armed later stays armed: whichever fires first drops everything spent.
            try:
                if on_loop_now:
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
            if on_loop_now or loop is None:
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
        lane = self.lane
        if lane.state in ("connecting", "new"):
            return  # the connection attempt's end flushes them (see DaskLane._connect)
        batch = list(self._outbox)
        self._outbox.clear()
        client = lane.client
        if lane.state != "connected" or client is None or client.status != "running":
            lane.check_connection()
            for call in batch:
                self.counts["refused_unavailable"] += 1
                self.finish(call, lane.unavailable_error(), True)
            return
        groups: dict[tuple[str | None, str | None], list[DaskCall]] = {}
        for call in batch:
            if call.cancelled:
                continue
            candidates, resource = lane.placement(call.weight)
            pinned = None if call.affinity is None or not candidates else rendezvous(call.affinity, candidates)
            groups.setdefault((resource, pinned), []).append(call)
        if self._spent:
            # Before the submission: each release is a loop callback (Future.__del__), so it runs
            # after client.map has put the new tasks in the client's buffer: one message.
            self._release_spent()
        for (resource, pinned), calls in groups.items():
            self._submit(client, calls, resource, pinned)

    def _submit(self, client: Any, calls: list[DaskCall], resource: str | None, pinned: str | None) -> None:
        options: dict[str, Any] = {"pure": False}
        if resource is not None:
            options["resources"] = {resource: 1}
        if pinned is not None:
            options["workers"] = [pinned]
            options["allow_other_workers"] = True  # the documented fallback when the pinned worker left
        topic = self.lane.topic
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
            self.finish(calls[0], exc, True)
            return
        now = time.perf_counter()
        loop = asyncio.get_running_loop()
        results = self.lane.results
        for call, future in zip(calls, futures):
            call.submitted_at = now
            with self._lock:
                if call.settled:  # cancelled meanwhile: cancel its task too
                    self.lane.spawn(_cancel_quietly(client, future, "cancelled"))
                    continue
                call.future = future
                self.inflight.add(call)
                self.by_key[call.key] = call
            self.counts["submitted"] += 1
            loop.create_task(results.watch(call, future))

    def take_unsettled(self) -> list[DaskCall]:
        """Every call without an outcome (queued here or on the cluster); the queue is emptied. Thread: loop."""
        with self._lock:
            leftover = list(self._outbox) + list(self.inflight)
            self._outbox.clear()
        return leftover

    def inflight_calls(self) -> list[DaskCall]:
        """The calls on the cluster now (a snapshot). Thread: any."""
        with self._lock:
            return list(self.inflight)


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """True if this thread is running *loop*."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def _cancel_quietly(client: Any, future: Any, reason: str) -> None:
    try:
        await client.cancel([future], reason=reason)
    except Exception as exc:  # noqa: BLE001 - the connection may be gone; the task then goes with it
        logger.debug("cancelling a Dask task failed: %s", exc)
