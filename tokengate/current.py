"""The documented "current coordinator" that decorated calls submit to.

This is tokengate's one piece of process-wide runtime state. Lookup order for
a decorated call:

1. on a coordinator's worker thread, that coordinator (so calls made inside a
   running token go to the same coordinator as their parent);
2. otherwise the most recently started coordinator that is still running.

Starting a coordinator pushes it; stopping it removes it, so the previous one
(if still running) becomes current again.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .coordinator import OperationsCoordinator

__all__ = ["current_coordinator", "for_this_thread", "running_token"]

_stack: list[OperationsCoordinator] = []
_stack_lock = threading.Lock()  # guards _stack (push/remove from any thread)
class _WorkerLocal(threading.local):
    # Class-level defaults make a miss on non-worker threads a cheap attribute
    # read instead of an AttributeError raised and caught inside getattr().
    coordinator: "OperationsCoordinator | None" = None
    worker: Any = None


_worker_local = _WorkerLocal()  # set on worker threads: their coordinator and Worker


def current_coordinator() -> OperationsCoordinator | None:
    """Return the coordinator decorated calls on this thread would submit to, or None."""
    return for_this_thread()


def for_this_thread() -> OperationsCoordinator | None:
    coordinator = _worker_local.coordinator
    if coordinator is not None:
        return coordinator
    stack = _stack
    return stack[-1] if stack else None


def running_token() -> Any:
    """The token running on this worker thread (innermost, for inline runs), or None elsewhere."""
    worker = _worker_local.worker
    return None if worker is None else worker.current


def push(coordinator: OperationsCoordinator) -> None:
    with _stack_lock:
        if coordinator in _stack:
            _stack.remove(coordinator)
        _stack.append(coordinator)


def remove(coordinator: OperationsCoordinator) -> None:
    with _stack_lock:
        if coordinator in _stack:
            _stack.remove(coordinator)


def bind_worker_thread(coordinator: OperationsCoordinator | None) -> None:
    _worker_local.coordinator = coordinator
