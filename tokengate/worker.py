"""A worker: one real thread that owns one bounded FIFO mailbox.

This module and ``OperationsCoordinator._complete`` / ``_drain_done`` are the
only places where worker threads and the event loop meet:

* a router (any thread, under the coordinator's routing lock) appends a token
  to ``mailbox`` and, if the worker is idle, wakes it; a token it queues in a
  pending queue instead wakes one idle worker that may take it;
* before parking, a worker sets ``idle`` and then looks again at its mailbox
  and the pending queues it serves, so a token is either seen by the worker
  or the router sees the worker idle and wakes it: no token waits while every
  worker that could run it sleeps;
* the worker pops tokens, claims each one (ADMITTED → EXECUTING, atomic under
  the state lock so a concurrent kill and a claim never both win), runs the
  function in a copy of the caller's context, and hands the finished token to
  ``coordinator._complete``, which batches completions back to the loop.

Counters ``routed`` (written under the routing lock) and ``finished`` (written
only by this worker's thread) are single-writer, so ``routed - finished`` is a
lock-free load estimate for the router.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Deque

from . import current
from .states import TokenState
from .token import EMPTY_CONTEXT, NO_KWARGS

if TYPE_CHECKING:
    from .coordinator import OperationsCoordinator
    from .routing import Router
    from .token import TaskToken

__all__ = ["Worker", "run_token"]

logger = logging.getLogger(__name__)

_ADMITTED = TokenState.ADMITTED
_WAITING = TokenState.WAITING
_EXECUTING = TokenState.EXECUTING
_CLAIMABLE = frozenset({_ADMITTED})
_perf = time.perf_counter
_new_context = contextvars.Context


def run_token(token: TaskToken[Any], worker: Worker, claimable: frozenset[TokenState] = _CLAIMABLE) -> bool:
    """Claim *token* and run it on the calling thread; return False if it could not be claimed.

    Thread: a worker thread (its own, or one running a child inline from ``get()``).
    """
    # Read the call before claiming: once claimed, a timeout may settle the
    # token and drop these references while we still need them.
    guarded = token._guarded
    args = token._args
    kwargs = token._kwargs
    context = token._context
    if guarded is None or args is None or kwargs is None or context is None:
        return False
    # The claim: atomic under the state lock, so a concurrent kill and a claim never both win.
    lock = token._coordinator._state_lock
    lock.acquire()  # not `with`: it costs twice as much, once per call
    try:
        if token._tstate not in claimable:
            return False
        token._tstate = _EXECUTING
    finally:
        lock.release()
    token.worker_id = worker.worker_id
    token.core_id = worker.core_id
    outer_current = worker.current  # set when a parent runs this child inline
    worker.current = token  # also what current.running_token() reports
    started = token.started_at = _perf()
    # The outcome goes to the loop beside the token's own, not into it: a
    # timeout or a stop may already have settled the token, and its outcome
    # must not change.
    outcome: Any
    if context is EMPTY_CONTEXT:
        context = _new_context()  # isolated like a copy: what the call sets stays with it
    try:
        # No `**kwargs` for the common call without keywords: it would build a dict per call.
        if kwargs is NO_KWARGS:
            outcome = context.run(guarded.func, *args)
        else:
            outcome = context.run(guarded.func, *args, **kwargs)
        is_error = False
    except BaseException as exc:  # noqa: BLE001 - the function's own error is the outcome
        # Drop this frame from the traceback: it references the token and would
        # keep it (and its arguments) alive through a reference cycle.
        if exc.__traceback__ is not None:
            exc.__traceback__ = exc.__traceback__.tb_next
        outcome = exc
        is_error = True
        del exc
    finished = token.finished_at = _perf()
    worker.current = outer_current
    if outer_current is None:  # nested inline runs are already inside the parent's busy time
        worker.busy_time += finished - started
    worker.executed += 1
    del args, kwargs, context, guarded
    # The outcome rides on the token in its own slots (not a tuple per call:
    # a burst would keep thousands alive for the collector to scan).
    token._run_outcome = outcome
    token._run_error = is_error
    coordinator = token._coordinator
    if finished - started < coordinator._pace_after or outer_current is not None:
        coordinator._complete(token)
    else:  # a long call, on the worker's own thread: settled before the next starts (see _complete_paced)
        coordinator._complete_paced(token, worker)
    # A failing function's frame keeps its caller's frame (this one) alive via
    # f_back, with the locals it had on exit: drop them so a traceback never
    # pins the token or the outcome.
    del token, outcome, coordinator
    return True


class Worker:
    """One thread of a worker domain (a "core"), with its bounded mailbox.

    This is the thread lane's worker: it runs each call on its own thread. A
    lane whose calls run elsewhere subclasses it and overrides ``run`` (how
    one claimed call is executed), ``_thread_started`` / ``_thread_exiting``
    (what the thread sets up and tears down) and ``describe``; routing,
    mailboxes, refills and stealing stay the same for every lane.
    """

    #: How this worker runs one token (claim, execute, hand to the loop); see run_token.
    run = staticmethod(run_token)
    #: The letter in worker ids: ``core1-w0`` for threads.
    kind = "w"

    __slots__ = (
        "coordinator",
        "core_id",
        "index",
        "worker_id",
        "mailbox",
        "routed",
        "finished",
        "executed",
        "busy_time",
        "idle",
        "current",
        "stopping",
        "classes",
        "_park",
        "thread",
        "router",
        "settled",
    )

    def __init__(self, coordinator: OperationsCoordinator, core_id: int, index: int) -> None:
        self.coordinator = coordinator
        self.core_id = core_id
        self.index = index
        self.worker_id = f"core{core_id}-{self.kind}{index}"
        self.mailbox: Deque[TaskToken[Any]] = collections.deque()
        self.routed = 0  # tokens placed in the mailbox; written under the routing lock
        self.finished = 0  # tokens popped and done with; written by this thread only
        self.executed = 0
        self.busy_time = 0.0
        self.idle = False
        self.current: TaskToken[Any] | None = None
        self.stopping = False
        # Weight classes this worker may take from pending queues, owners first.
        self.classes: tuple[str, ...] = ()
        # A lock used as a binary "wake-up" signal: held while the worker may park.
        self._park = threading.Lock()
        self._park.acquire()
        self.thread: threading.Thread | None = None
        self.router: Router = None  # type: ignore[assignment]  # set by the Router that owns this worker
        # Set by the loop when this worker's last long call is settled (see _complete_paced).
        self.settled = threading.Event()

    def start(self, name_prefix: str) -> None:
        self.thread = threading.Thread(target=self._main, name=f"{name_prefix}-{self.worker_id}", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """Unpark the worker if it is parked. Thread: any."""
        try:
            self._park.release()
        except RuntimeError:  # already released: a wake-up is pending anyway
            pass

    def _main(self) -> None:
        current.bind_worker_thread(self.coordinator)
        current._worker_local.worker = self
        try:
            try:
                self._thread_started()
            except Exception:  # noqa: BLE001 - the worker must still serve its mailbox
                logger.exception("worker %s: setting up its thread failed", self.worker_id)
            # Worker threads start from an empty context; each call runs in a copy
            # of its caller's context (see run_token).
            contextvars.Context().run(self._loop)
        finally:
            try:
                self._thread_exiting()
            except Exception:  # noqa: BLE001 - logged; the thread is leaving anyway
                logger.exception("worker %s: tearing down its thread failed", self.worker_id)

    def _thread_started(self) -> None:
        """Called on the worker's thread before it takes its first token."""

    def _thread_exiting(self) -> None:
        """Called on the worker's thread when it leaves (at stop)."""

    def describe(self) -> dict[str, Any]:
        """Lane-specific fields for this worker's row in ``stats()["cores"][...]["workers"]``."""
        return {}

    def _loop(self) -> None:
        coordinator = self.coordinator
        mailbox = self.mailbox
        pop = mailbox.popleft
        refill = coordinator._refill
        has_work = self.router.has_work_for
        idle_hint = self.router.idle_hint
        run = self.run
        steal_wait = coordinator._steal_wait
        while True:
            try:
                token = pop()
            except IndexError:
                if refill(self):
                    continue
                if self.stopping:
                    return
                # Park. Set `idle` before re-checking the mailbox and the pending
                # queues: a router that appends or queues and then reads
                # idle == False is guaranteed we see its token in this re-check
                # (see the module docstring).
                self.idle = True
                for weight in self.classes:
                    idle_hint[weight] = True
                if mailbox or self.stopping or has_work(self):
                    self.idle = False
                    continue
                # Sleep until woken, or until a sibling's running call would
                # count as stuck (then the refill above may take its queue).
                wait = steal_wait(self)
                if wait is None:
                    self._park.acquire()
                else:
                    self._park.acquire(timeout=wait)
                self.idle = False
                continue
            try:
                run(token, self)
            except BaseException:  # pragma: no cover - run_token contains user errors itself
                logger.exception("worker %s: internal error while running %r", self.worker_id, token)
            self.finished += 1
            del token
