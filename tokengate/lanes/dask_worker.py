"""The Dask lane's worker: a routed call runs as a task on a Dask distributed cluster.

Each :class:`DaskWorker` is an ordinary routed worker (a thread with a bounded
mailbox, in a weight-class domain, behind the same bulkheads) that stands for
one slot of calls in flight on the cluster: it claims a token exactly as the
thread lane does, hands the call to the coordinator's
:class:`~tokengate.lanes.dask.DaskLane` (which submits it on the loop, batched
with the rest of its burst) and blocks until the outcome is back. So
admission, policies, pending queues, kill, timeout, drain and statistics are
shared with the other lanes, and the lane's workers per domain bound how many
calls of a weight class are on the cluster at once (``dask_inflight``).

:meth:`DaskWorker.interrupt` (used by ``kill()``, a ``timeout`` and ``stop()``
past its grace) cancels the call's Dask future: a task still waiting on the
cluster never runs; one already running on a Dask worker keeps that worker's
thread until the function returns (Dask cannot interrupt a thread), and its
result is dropped. The token settles KILLED/TIMEOUT at once either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Hashable

from ..states import TokenState
from ..worker import Worker
from .base import LaneWorker
from .dask import DaskCall, DaskLane, task_key
from .dask_errors import ClusterUnavailable

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator
    from ..token import TaskToken

__all__ = ["DaskWorker", "run_on_dask", "affinity_of"]

_ADMITTED = frozenset({TokenState.ADMITTED})


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
    """Claim *token* and run its call on the cluster; False if it could not be claimed.

    Thread: the worker's own thread (Dask-lane tokens are never run inline by
    a waiting ``get()``: the waiting thread is not this lane's).
    """
    assert isinstance(worker, DaskWorker)
    guarded = token._guarded
    args = token._args
    kwargs = token._kwargs
    if guarded is None or args is None or kwargs is None:
        return False
    call = DaskCall(guarded.func, args, kwargs or None, guarded.weight, affinity_of(token),
                    task_key(token.operation_type, token.token_id), token)

    def record() -> None:
        worker.call = call

    if worker.take_call(token, claimable, record) is None:
        return False
    started = token.started_at
    assert started is not None
    del args, kwargs, guarded
    try:
        # Returns once the call's outcome is set; DaskLane._finish has then
        # already handed the token to the coordinator (from the loop).
        worker.lane.run(call, wait_connect=None)
    except Exception as exc:  # noqa: BLE001 - an internal failure is this call's outcome, never a lost call
        worker.lane._finish(call, exc, True)
    def forget() -> None:
        worker.call = None

    worker.leave_call(started, forget)
    del token, call
    return True


class DaskWorker(LaneWorker):
    """A routed worker whose calls run on the Dask cluster (see the module docstring)."""

    __slots__ = ("lane", "call")

    run = staticmethod(run_on_dask)
    kind = "d"

    def __init__(self, coordinator: OperationsCoordinator, core_id: int, index: int, lane: DaskLane) -> None:
        super().__init__(coordinator, core_id, index)
        self.lane = lane
        self.call: DaskCall | None = None  # guarded with `current` by current_lock (see LaneWorker)

    def _thread_started(self) -> None:
        loop = self.coordinator.loop
        if loop is not None:
            self.lane.start(loop)

    def interrupt(self, token: TaskToken[Any], reason: str) -> bool:
        """Cancel the Dask task running *token*; False if it is not running here. Thread: any."""
        with self.current_lock:
            call = self.call
            if self.current is not token or call is None:
                return False
        # The token is already settled (killed, timed out, stopped): this outcome is only the worker's.
        return self.lane.cancel(call, reason, ClusterUnavailable(f"cancelled: {reason}", reason=reason))

    @property
    def ready(self) -> bool:
        """See :attr:`DaskLane.ready`."""
        return self.lane.ready

    def describe(self) -> dict[str, Any]:
        call = self.call
        return {"lane": "dask", "task": None if call is None else call.key}
