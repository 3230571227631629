"""The Dask lane's worker: a routed call runs as a task on a Dask distributed cluster.

Each :class:`DaskWorker` is an ordinary routed worker (a bounded mailbox, in a
weight-class domain, behind the same bulkheads) that stands for one slot of
calls in flight on the cluster. Unlike the other lanes' workers it has **no
thread**: the coordinator's loop drives it. A wake-up (a token placed in its
mailbox, or pending work it may take) schedules :meth:`DaskWorker._pump` on the
loop, which claims the next token exactly as a worker thread does and hands
the call to the coordinator's :class:`~tokengate.lanes.dask.DaskLane` (which
submits it with the rest of its burst); when the outcome is back (on the loop,
where the Dask client lives), the token is settled and the slot takes its next
token. So admission, policies, pending queues, kill, timeout, drain and
statistics are shared with the other lanes, the lane's slots per domain bound
how many calls of a weight class are on the cluster at once
(``dask_inflight``), and a call costs no thread hand-off either way (a slot
waiting on a Dask future used to be a blocked thread: two hand-offs per call,
and one thread per call in flight).

What a thread-driven worker does when it parks, a slot does when it finds
nothing to take: it sets ``idle``, then looks at its mailbox and the pending
queues once more (the router wakes an idle worker after queueing), so no token
waits while a slot that may run it is idle. One difference: a parked thread
wakes after ``steal_after`` to take calls queued behind a sibling's long call;
a slot takes them only when one of its own calls ends (Dask-lane calls are
placed on idle slots first, so calls queue behind a busy slot only when every
slot of the class is busy).

:meth:`DaskWorker.interrupt` (used by ``kill()``, a ``timeout`` and ``stop()``
past its grace) cancels the call's Dask future: a task still waiting on the
cluster never runs; one already running on a Dask worker keeps that worker's
thread until the function returns (Dask cannot interrupt a thread), and its
result is dropped. The token settles KILLED/TIMEOUT at once either way.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Hashable

from ..routing import Router
from ..states import TokenState
from ..worker import Worker
from .base import LaneWorker
from .dask import DaskLane
from .dask_calls import DaskCall, task_key
from .dask_errors import ClusterDown, ClusterUnavailable

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator
    from ..token import TaskToken

__all__ = ["DaskRouter", "DaskWorker", "run_on_dask", "affinity_of"]

logger = logging.getLogger("tokengate.lanes")

_ADMITTED = frozenset({TokenState.ADMITTED})
# Lane states in which new calls are refused at submit.
_DOWN = frozenset({"unavailable", "closed"})


def affinity_of(token: TaskToken[Any]) -> Hashable | None:
    """What pins *token* to one Dask worker: its sticky key, or its conductor chain; None if nothing does.

    Read from the policies' per-call records (duck-typed: a policy that is not
    installed simply leaves none).
    """
    data = token.policy_data
    if not data:
        return None
    ticket = data.get("sticky.ticket")
    pin = getattr(ticket, "pin", None)
    if pin is not None:
        return ("sticky", pin.key)
    member = data.get("conductor.member")
    domain = getattr(member, "seed_domain", None)
    if domain is not None:
        return ("conductor", domain.ident)
    return None


def run_on_dask(token: TaskToken[Any], worker: Worker, claimable: frozenset[TokenState] = _ADMITTED) -> bool:
    """Claim *token* and send its call to the cluster; False if it could not be claimed.

    Returns once the call is queued for submission: the slot is busy until
    :meth:`DaskWorker.call_done`. Thread: the coordinator's loop (Dask-lane
    tokens are never run inline by a waiting ``get()``: the waiting thread is
    not this lane's).
    """
    assert isinstance(worker, DaskWorker)
    guarded = token._guarded
    args = token._args
    kwargs = token._kwargs
    if guarded is None or args is None or kwargs is None:
        return False
    call = DaskCall(guarded.func, args, kwargs or None, guarded.weight, affinity_of(token),
                    task_key(token.operation_type, token.token_id), token, worker)

    def record() -> None:
        worker.call = call

    if worker.take_call(token, claimable, record) is None:
        return False
    try:
        worker.lane.send(call)
    except Exception as exc:  # noqa: BLE001 - an internal failure is this call's outcome, never a lost call
        worker.lane.calls.finish(call, exc, True)
    return True


class DaskRouter(Router):
    """The Dask lane's router: refuses new calls at submit while the lane has no scheduler.

    A call submitted while the lane is ``unavailable`` (the connection was
    lost and not yet re-made, or an optional lane never connected) raises
    :class:`~tokengate.lanes.dask_errors.ClusterDown` from the decorated call
    itself, instead of being accepted to settle with ``ClusterUnavailable``
    later. Only first submissions are refused (``refuse=True``): calls already
    accepted and routed again (retries, refills) go on and settle with
    ``ClusterUnavailable`` when they reach a slot. Set ``dask`` after
    construction. Thread: any, under the routing lock (as every route).
    """

    dask: DaskLane | None = None

    def route(self, token: TaskToken[Any], pin: int | None, *, refuse: bool) -> Worker | None:
        lane = self.dask
        if refuse and lane is not None and lane.state in _DOWN:
            lane.counts["refused_at_submit"] += 1
            raise ClusterDown(
                f"{token.operation_type!r} refused: {lane.unavailable_reason()}; retry when the lane has "
                "reconnected (GET /tokengate/cluster shows its state)",
                address=lane.address, reason=lane.state, operation_type=token.operation_type)
        return super().route(token, pin, refuse=refuse)


class DaskWorker(LaneWorker):
    """A routed slot whose calls run on the Dask cluster, driven by the loop (see the module docstring)."""

    __slots__ = ("lane", "call", "_pump_scheduled", "_pumping")

    run = staticmethod(run_on_dask)
    kind = "d"

    def __init__(self, coordinator: OperationsCoordinator, core_id: int, index: int, lane: DaskLane) -> None:
        super().__init__(coordinator, core_id, index)
        self.lane = lane
        self.call: DaskCall | None = None  # guarded with `current` by current_lock (see LaneWorker)
        self._pump_scheduled = False
        self._pumping = False  # inside _pump (loop only): see call_done

    def start(self, name_prefix: str) -> None:
        """Start serving: connect the lane (once) and take what is already queued. No thread is started."""
        loop = self.coordinator.loop
        if loop is None:
            return
        self.lane.start(loop)
        self.idle = False
        self._schedule_pump(loop)

    def wake(self) -> None:
        """Have the loop look at the mailbox and the pending queues. Thread: any (often under the routing lock)."""
        if self._pump_scheduled:
            return  # the scheduled pump reads the mailbox after clearing the flag: it sees this token
        loop = self.coordinator.loop
        if loop is not None:
            self._schedule_pump(loop)

    def _schedule_pump(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pump_scheduled = True
        try:
            if threading.get_ident() == self.coordinator._loop_thread_id:
                loop.call_soon(self._pump)
            else:
                loop.call_soon_threadsafe(self._pump)
        except RuntimeError:  # the loop is closed: the coordinator is gone
            self._pump_scheduled = False

    def _pump(self) -> None:
        """Take the next token (mailbox, then the pending queues) unless a call is out. Thread: loop."""
        self._pump_scheduled = False
        if self.call is not None or self.stopping:
            return
        self._pumping = True
        try:
            self._take_next()
        finally:
            self._pumping = False

    def _take_next(self) -> None:
        mailbox = self.mailbox
        while True:
            try:
                token = mailbox.popleft()
            except IndexError:
                if self.coordinator._refill(self):
                    continue
                # Idle: set the flag, then look again (see the module docstring and Worker._loop).
                self.idle = True
                for weight in self.classes:
                    self.router.idle_hint[weight] = True
                if mailbox or self.router.has_work_for(self):
                    self.idle = False
                    continue
                return
            try:
                sent = run_on_dask(token, self)
            except BaseException:  # pragma: no cover - run_on_dask turns call errors into outcomes
                logger.exception("Dask slot %s: internal error while sending %r", self.worker_id, token)
                sent = False
            del token
            if sent:
                return  # busy until call_done
            self.finished += 1  # settled before it was claimed (killed, timed out): next

    def call_done(self, call: DaskCall) -> None:
        """The outcome of this slot's call is set: free the slot and take the next token. Thread: loop."""
        if self.call is not call:
            return
        started = self.current.started_at if self.current is not None else None

        def forget() -> None:
            self.call = None

        self.leave_call(started if started is not None else time.perf_counter(), forget)
        self.finished += 1
        if self.stopping:
            return
        if self._pumping:
            # Finished inside the pump that sent it (it failed at once: no connection): take the
            # next token in a loop callback of its own. Pumping again from here would nest one
            # frame pair per queued call (RecursionError).
            self.wake()
        else:
            self._pump()

    def interrupt(self, token: TaskToken[Any], reason: str) -> bool:
        """Cancel the Dask task running *token*; False if it is not running here. Thread: any."""
        with self.current_lock:
            call = self.call
            if self.current is not token or call is None:
                return False
        # The token is already settled (killed, timed out, stopped): this outcome is only the slot's.
        return self.lane.cancel(call, reason, ClusterUnavailable(f"cancelled: {reason}", reason=reason))

    @property
    def ready(self) -> bool:
        """See :attr:`DaskLane.ready`."""
        return self.lane.ready

    def describe(self) -> dict[str, Any]:
        call = self.call
        return {"lane": "dask", "task": None if call is None else call.key}
