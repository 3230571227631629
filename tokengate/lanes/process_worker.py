"""The process lane's worker: a routed call runs in a worker process, not on the worker's thread.

Each :class:`ProcessWorker` is an ordinary routed worker (a thread with a
bounded mailbox, in a weight-class domain, behind the same bulkheads) that owns
one :class:`~tokengate.lanes.process.ChildProcess` for life. The thread claims a
token exactly as the thread lane does, ships the call to its process by
reference (:class:`~tokengate.lanes.references.FunctionRef`: module and
qualified name, never the function object), blocks until the outcome comes
back and hands it to the loop. So admission, policies, pending queues, sticky
pins, kill, timeout, drain and statistics are shared with the thread lane, and
a sticky key pins to one *process*, whose caches are then really reused.

What only this lane can do: stop a running call. :meth:`ProcessWorker.interrupt`
(used by ``kill()``, a ``timeout`` and ``stop()`` past its grace) ends the
process running the token; the token settles KILLED/TIMEOUT with
``started=True`` and the process is replaced before the next call.

A process that dies during a call (segfault, ``os._exit``, the OOM killer)
fails only that call, with :class:`~tokengate.errors.WorkerCrashed` (a retry
policy may retry it), and is replaced.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ..states import TokenState
from ..worker import Worker
from .base import LaneWorker

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator
    from ..token import TaskToken
    from .process import ChildProcess

__all__ = ["ProcessWorker", "run_in_process"]

logger = logging.getLogger("tokengate.lanes")

_ADMITTED = frozenset({TokenState.ADMITTED})


def run_in_process(token: TaskToken[Any], worker: Worker, claimable: frozenset[TokenState] = _ADMITTED) -> bool:
    """Claim *token* and run its call in *worker*'s process; False if it could not be claimed.

    Thread: the worker's own thread (process-lane tokens are never run inline
    by a waiting ``get()``: the waiting thread is not this lane's).
    """
    assert isinstance(worker, ProcessWorker)
    call = worker.take_call(token, claimable)
    if call is None:
        return False
    guarded, args, kwargs = call
    del call
    ref = guarded.reference
    assert ref is not None  # set at decoration for every process-lane function
    started = token.started_at
    assert started is not None
    try:
        if guarded.map_of is not None:  # a map() chunk: one message, the outcome of each item back
            items = args[0]
            value: Any = worker.child.call_batch(ref, [(item, None) for item in items], chunksize=max(1, len(items)))
            is_error = False
        else:
            outcome = worker.child.call(ref, args, kwargs or None)
            value, is_error = (outcome.value, False) if outcome.ok else (outcome.error, True)
    except Exception as exc:  # noqa: BLE001 - crashed, terminated, could not start: this call's outcome
        value = exc
        is_error = True
    token.finished_at = worker.leave_call(started)
    del args, kwargs, guarded
    token._run_outcome = value
    token._run_error = is_error
    token._coordinator._complete(token)
    del token, value
    return True


class ProcessWorker(LaneWorker):
    """A routed worker whose calls run in the worker process it owns (see the module docstring)."""

    __slots__ = ("child", "options", "warm", "started")

    run = staticmethod(run_in_process)
    kind = "p"

    def __init__(self, coordinator: OperationsCoordinator, core_id: int, index: int, options: dict[str, Any],
                 warm: bool) -> None:
        super().__init__(coordinator, core_id, index)
        # The handle is made on the worker's thread when it starts (see
        # _thread_started): a coordinator that never starts holds no socket.
        self.child: ChildProcess = None  # type: ignore[assignment]
        self.options = options
        self.warm = warm
        self.started = threading.Event()  # set once the handle exists (and, when warm, its process is up)

    def _thread_started(self) -> None:
        from .process import ChildProcess

        self.child = ChildProcess(name=f"{self.coordinator.name}-{self.worker_id}", **self.options)
        # Warm start: each worker starts its process on its own thread, so all
        # of a lane's processes start in parallel and off the request path.
        if self.warm:
            self.start_process()
        self.started.set()

    def start_process(self) -> None:
        """Start this worker's process now if it is not running (a failure is retried by the next call)."""
        try:
            self.child.start()
        except Exception:  # noqa: BLE001 - never let the worker thread die: calls then get the error
            logger.exception("%s: worker process failed to start; the next call tries again", self.worker_id)

    def _thread_exiting(self) -> None:
        if self.child is not None:
            self.child.close(timeout=0.0)

    def interrupt(self, token: TaskToken[Any], reason: str) -> bool:
        """End the process running *token* (it is replaced before the next call); False if it is not running here.

        Thread: any.
        """
        with self.current_lock:
            if self.current is not token or self.child is None:
                return False
            return self.child.terminate(reason)

    @property
    def ready(self) -> bool:
        """True once this worker's process is up (always True when processes start on demand)."""
        if not self.warm:
            return True
        return self.started.is_set() and self.child.stats().startup_seconds is not None

    def describe(self) -> dict[str, Any]:
        child = self.child
        return {"lane": "process", "process": None if child is None else child.stats().as_dict()}
