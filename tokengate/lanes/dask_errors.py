"""Errors of the Dask lane that the process lane's types do not already cover.

Importing this module never imports Dask. A Dask worker that dies during a call
(Dask's ``KilledWorker``) is the process lane's
:class:`~tokengate.errors.WorkerCrashed`; a running call stopped by kill,
timeout or stop settles with the coordinator's own ``TokenKilled`` /
``TokenTimeout`` / ``CoordinatorStopped``, as on every lane.
"""

from __future__ import annotations

from ..errors import LaneClosed, Rejected, WorkerTerminated

__all__ = ["ClusterDown", "ClusterUnavailable", "TaskCancelledOnCluster"]


class ClusterUnavailable(LaneClosed):
    """The Dask lane has no working connection to its scheduler, so the call did not run there.

    Raised for a call made while the scheduler is unreachable (at start, when
    the lane is ``dask_optional``; or after the connection was lost, until the
    coordinator has reconnected), and for a call that was on the cluster when
    the connection was lost (it may have run partly). It is a
    :class:`~tokengate.errors.LaneClosed`, so the FastAPI integration answers
    503 ``lane_closed`` with ``Retry-After``; the other lanes keep serving.
    ``address`` is the scheduler's address (None for an embedded cluster that
    never started); ``reason`` says what happened.
    """

    def __init__(self, message: str, *, address: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.address = address
        self.reason = reason


class ClusterDown(ClusterUnavailable, Rejected):
    """A Dask-lane call refused at submit: the lane has lost its scheduler (or could not reach it).

    Raised by the decorated call itself (the token never exists for the
    caller), while the lane is ``unavailable``: after the connection was lost
    and until the coordinator has reconnected, or while an optional lane has
    not connected yet. It is both a :class:`ClusterUnavailable` (the FastAPI
    integration answers 503 ``lane_closed`` with ``Retry-After``) and a
    :class:`~tokengate.errors.Rejected`, counted as refused like every other
    refusal at submit. Calls already accepted (queued behind the lane's
    slots) settle with :class:`ClusterUnavailable` instead.
    """

    def __init__(self, message: str, *, address: str | None = None, reason: str = "",
                 operation_type: str | None = None) -> None:
        ClusterUnavailable.__init__(self, message, address=address, reason=reason)
        self.operation_type = operation_type
        #: Seconds after which a retry may find the lane reconnected (its reconnect interval).
        self.retry_after = 2.0


class TaskCancelledOnCluster(WorkerTerminated):
    """The call's task was cancelled on the cluster by someone else (another client, the Dask dashboard).

    TokenGate's own kill, timeout and stop never produce this error: they settle
    the token themselves. ``reason`` is the reason Dask gave.
    """
