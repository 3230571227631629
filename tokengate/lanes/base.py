"""What every lane whose calls run off the worker's own thread shares: the claim and the interrupt.

The thread lane's :class:`~tokengate.worker.Worker` runs a call on its thread,
so nothing can stop it. A lane that runs calls elsewhere (a worker process, a
cluster) can: its worker records which token it is running, under a lock, so
that :meth:`LaneWorker.interrupt` (``kill()``, a ``timeout``, ``stop()`` past
its grace) reaches the call it means and never the next one.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..states import TokenState
from ..worker import Worker

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator
    from ..decorator import GuardedFunction
    from ..token import TaskToken

__all__ = ["LaneWorker"]

_EXECUTING = TokenState.EXECUTING
_perf = time.perf_counter


class LaneWorker(Worker):
    """A routed worker whose calls run outside its thread; subclasses define ``run`` and ``interrupt``."""

    __slots__ = ("current_lock",)

    def __init__(self, coordinator: OperationsCoordinator, core_id: int, index: int) -> None:
        super().__init__(coordinator, core_id, index)
        # Guards `current` (and what a subclass records with it) against interrupt().
        self.current_lock = threading.Lock()

    def take_call(
        self, token: TaskToken[Any], claimable: frozenset[TokenState], record: Callable[[], None] | None = None,
    ) -> tuple[GuardedFunction[..., Any], tuple[Any, ...], dict[str, Any]] | None:
        """Read *token*'s call and claim it (→ EXECUTING); None if it is settled or could not be claimed.

        The claim (under the state lock) and ``current`` move together under
        ``current_lock``, with *record* (what the subclass needs to interrupt
        this call), so an interrupt that sees this token as current stops this
        call. Sets ``worker_id``, ``core_id`` and ``started_at``. Thread: this worker's.
        """
        guarded = token._guarded
        args = token._args
        kwargs = token._kwargs
        if guarded is None or args is None or kwargs is None:
            return None
        with self.current_lock:
            if not token._transition(_EXECUTING, claimable):
                return None
            self.current = token
            if record is not None:
                record()
        token.worker_id = self.worker_id
        token.core_id = self.core_id
        token.started_at = _perf()
        return guarded, args, kwargs

    def leave_call(self, started: float, forget: Callable[[], None] | None = None) -> float:
        """The call ended: clear ``current`` (and, with *forget*, the subclass's record); count it. Returns now."""
        with self.current_lock:
            self.current = None
            if forget is not None:
                forget()
        finished = _perf()
        self.busy_time += finished - started
        self.executed += 1
        return finished

    def carries(self, token: TaskToken[Any]) -> bool:
        """True while this worker has *token*'s call in hand (what :meth:`interrupt` can reach). Thread: any.

        Here: while it is ``current``. A worker with several calls in flight
        (the process lane's pipelining) answers for each of them.
        """
        return self.current is token

    def interrupt(self, token: TaskToken[Any], reason: str) -> bool:
        """Stop *token*'s call if this worker is running it; False otherwise. Thread: any."""
        raise NotImplementedError
