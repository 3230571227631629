"""``TaskToken``: the handle a decorated call returns at once.

A token is an :class:`asyncio.Future` (so ``await token`` and
``asyncio.gather(*tokens)`` cost no wrapper task) plus a small, explicit state
machine (:mod:`tokengate.states`). Two views exist and are kept apart on
purpose:

* the *awaiter view* (the future): done when the outcome is known to awaiters,
  or when the awaiting task was cancelled;
* the *token view* (``state``): where the call really is. A token whose
  awaiter went away while it was running keeps ``EXECUTING`` until the function
  returns, then records ``COMPLETED``/``FAILED`` honestly.

Threads meet here in three places only, each commented: the state lock taken
by every transition, the settle-waiter list used by ``get()`` and by awaiters
on a foreign loop, and ``cancel()`` called by asyncio when an awaiting task is
cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, Generic, TypeVar

from . import current
from .errors import InvalidTransition, SettlementFailed, TokengateError, TokenKilled, describe_exception
from .states import TRANSITIONS, TokenState

if TYPE_CHECKING:
    from .coordinator import KillResult, OperationsCoordinator
    from .decorator import GuardedFunction

__all__ = ["TaskToken"]

R = TypeVar("R")

logger = logging.getLogger("tokengate.token")

_S = TokenState
# Members bound once: an enum attribute look-up costs about 100 ns on CPython 3.11.
_CREATED = TokenState.CREATED
_ids = itertools.count(1)  # process-wide, so ids never collide across coordinators
# Stored instead of a call's own empty ``**kwargs`` dict, which is then freed at
# once instead of living (and being scanned by the garbage collector) until the
# token settles. Never mutated: the run passes no keywords for it (see worker.run_token).
NO_KWARGS: dict[str, Any] = {}
# Stored instead of a copy of an empty caller context (the common case outside
# web frameworks): the copy is freed at once, and the run gets a fresh empty
# context of its own (see worker.run_token). Never entered.
EMPTY_CONTEXT = contextvars.Context()

# Guards TaskToken._waiters on every token: registration by get()/foreign
# awaiters and the one-time swap to _SETTLED when the token settles.
_WAITERS_LOCK = threading.Lock()
_SETTLED: list[Callable[[], None]] = []  # sentinel: "already settled, call nothing"

_future_init = asyncio.Future.__init__
_get_ident = threading.get_ident
_future_await = asyncio.Future.__await__
_future_cancel = asyncio.Future.cancel
_future_set_result = asyncio.Future.set_result
_future_set_exception = asyncio.Future.set_exception


class TaskToken(asyncio.Future[R], Generic[R]):
    """The awaitable handle of one call of a decorated function.

    Calling a decorated function submits the call at once and returns its
    token; awaiting only waits. These two are equivalent, except that the
    second does not block the event loop::

        resize.__wrapped__(data, 200)      # the plain function, run inline
        await resize(data, 200)            # the guarded call, run on a worker thread

    The function's own exception propagates unchanged from ``await token`` and
    ``token.get()``. Refusals raise :class:`~tokengate.errors.TokenKilled`,
    :class:`~tokengate.errors.TokenTimeout` or a
    :class:`~tokengate.errors.Rejected` subclass.

    Cancelling the task that awaits a token that has not started kills the
    token, so no work is wasted when a client goes away. Wrap it in
    ``asyncio.shield(token)`` to let it run anyway. A token that is already
    executing cannot be interrupted: the awaiter is released at once and the
    thread finishes the call.

    Once settled, a token holds no reference to its function's arguments.

    Thread: create and settle through the coordinator only; ``await`` from any
    event loop; ``get()`` from any thread except the coordinator's loop thread.
    """

    __slots__ = (
        "_seq",
        "_coordinator",
        "_guarded",
        "_args",
        "_kwargs",
        "_context",
        "_tstate",
        "_outcome",
        "_is_error",
        "_run_outcome",
        "_run_error",
        "_waiters",
        "_finalized",
        "_published",
        "_retrieved",
        "_release_early",
        "_awaiter_gone",
        "_plan",
        "tags",
        "operation_type",
        "weight",
        "core_id",
        "worker_id",
        "attempt",
        "created_at",
        "admitted_at",
        "started_at",
        "finished_at",
        "kill_reason",
        "timer",
        "policy_data",
        "_where",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        coordinator: OperationsCoordinator,
        guarded: GuardedFunction[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: contextvars.Context,
    ) -> None:
        _future_init(self, loop=loop)
        self._seq = next(_ids)
        self._coordinator = coordinator
        self._guarded: GuardedFunction[..., R] | None = guarded
        self._args: tuple[Any, ...] | None = args
        self._kwargs: dict[str, Any] | None = kwargs
        self._context: contextvars.Context | None = context
        self._tstate = _CREATED
        self._outcome: Any = None
        self._is_error = False
        # A worker's run result on its way to the loop (see _settlement._drain_done);
        # _run_error is None when no run result is waiting.
        self._run_outcome: Any = None
        self._run_error: bool | None = None
        self._waiters: list[Callable[[], None]] | None = None
        self._finalized = False  # the coordinator took charge of settling it (loop thread)
        self._published = False  # the outcome is visible to awaiters and get() (set last)
        self._retrieved = False  # get() consumed the outcome: asyncio need not warn about it
        self._release_early = False  # a policy released it before the core recorded its hold
        self._awaiter_gone = False  # an awaiter was cancelled: no further attempt (retries) is made
        self._plan: Any = None  # the coordinator's hook plan for this function (set at submit)
        self.tags = guarded.tags
        self.operation_type = guarded.operation_type
        self.weight = guarded.weight
        self.core_id: int | None = None
        self.worker_id: str | None = None
        self.attempt = 1
        self.created_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.kill_reason: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        # Per-token scratch space for policies (routing keys, tier slots...).
        self.policy_data: dict[str, Any] | None = None
        self._where = 0  # where a WAITING token sits (see routing.py)

    # -- identity and state -------------------------------------------------

    @property
    def token_id(self) -> str:
        """A process-unique id (decimal string), stable for the token's life."""
        return str(self._seq)

    @property
    def state(self) -> TokenState:
        """The token's current lifecycle state."""
        return self._tstate

    @property
    def settled(self) -> bool:
        """True once the token reached a terminal state."""
        return self._tstate in _TERMINAL

    @property
    def coordinator(self) -> OperationsCoordinator:
        """The coordinator this token was submitted to."""
        return self._coordinator

    @property
    def outcome(self) -> Any:
        """The call's outcome as policies see it: the return value, or the exception when ``is_error``.

        Set when a run finishes (so ``after_run`` hooks see the attempt that
        just ended) and when the token settles (``on_settle``: the final
        outcome, e.g. ``TokenKilled``); ``None`` before. Thread: the loop.
        """
        return self._outcome

    @property
    def is_error(self) -> bool:
        """True when :attr:`outcome` is an exception (the function raised, or the call was refused or stopped)."""
        return self._is_error

    @property
    def args(self) -> tuple[Any, ...] | None:
        """The call's positional arguments; ``None`` once settled."""
        return self._args

    @property
    def kwargs(self) -> dict[str, Any] | None:
        """The call's keyword arguments; ``None`` once settled."""
        kwargs = self._kwargs
        if kwargs is NO_KWARGS:
            return {}  # never hand out the shared empty dict
        return kwargs

    @property
    def guarded(self) -> GuardedFunction[..., R] | None:
        """The decorated function this token calls; ``None`` once settled."""
        return self._guarded

    def _transition(self, new: TokenState, expected: frozenset[TokenState] | None = None) -> bool:
        """Move to *new* if the table allows it; return False if it does not.

        Thread: any. The state lock makes check-and-set atomic so a worker's
        claim (ADMITTED → EXECUTING) and a kill never both succeed.
        """
        with self._coordinator._state_lock:
            old = self._tstate
            if new not in TRANSITIONS[old] or (expected is not None and old not in expected):
                return False
            self._tstate = new
            return True

    def _transition_settling(self, new: TokenState, error: BaseException,
                             expected: frozenset[TokenState] | None = None) -> bool:
        """Like ``_transition``, for a move to a terminal state that comes with its own error.

        The error is stored before the new state, under the state lock: a
        thread that sees the state (the loop settling a late completion of the
        same token) sees the error with it. Thread: any.
        """
        with self._coordinator._state_lock:
            old = self._tstate
            if new not in TRANSITIONS[old] or (expected is not None and old not in expected):
                return False
            self._outcome, self._is_error = error, True
            self._tstate = new
            return True

    def _force_transition(self, new: TokenState) -> None:
        """Like ``_transition`` but an illegal move is a bug: raise InvalidTransition."""
        if not self._transition(new):
            raise InvalidTransition(f"{self._tstate.name} -> {new.name}: {self!r}")

    # -- the awaiter view ---------------------------------------------------

    def __await__(self) -> Generator[Any, None, R]:
        # Fast path: awaited on the coordinator's loop thread, where the running
        # loop is the coordinator's (asyncio's own look-up costs a system call).
        coordinator = self._coordinator
        if _get_ident() == coordinator._loop_thread_id and self._loop is coordinator._loop:
            return _future_await(self)
        # Otherwise: awaited on the loop the token is bound to (the caller's)?
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None or running is self.get_loop():
            return _future_await(self)
        return self._await_from(running).__await__()

    __iter__ = __await__

    async def _await_from(self, loop: asyncio.AbstractEventLoop) -> R:
        # Awaited from another event loop: bridge through a future of that loop.
        return await self.as_future(loop)

    def as_future(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[R]:
        """A future of *loop* (default: the running loop) that settles with this token's outcome.

        A token belongs to the loop it was created on: the caller's running
        loop, or the coordinator's own loop for a call made from sync code in
        standalone mode. ``await token`` works on any loop, but asyncio's
        combinators (``asyncio.gather``, ``asyncio.wait_for``,
        ``asyncio.shield``, ``asyncio.wait``) refuse a future of another loop.
        Pass them ``token.as_future()`` instead. On the token's own loop this
        returns the token itself.

        Cancelling the returned future is like cancelling an awaiter: the
        token is killed if it has not started, and retried no more.

        Thread: the thread running *loop*.
        """
        if loop is None:
            loop = asyncio.get_running_loop()
        if loop is self.get_loop():
            return self
        bridge: asyncio.Future[R] = loop.create_future()

        def deliver() -> None:  # on *loop*'s thread
            if bridge.done():
                return
            try:
                result = self._result_now()
            except BaseException as exc:  # noqa: BLE001 - the outcome, whatever it is
                bridge.set_exception(exc)
            else:
                bridge.set_result(result)

        def wake() -> None:
            # Called from whichever thread settles the token.
            try:
                loop.call_soon_threadsafe(deliver)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

        def on_done(fut: asyncio.Future[R]) -> None:
            if fut.cancelled():
                self._coordinator._abandon(self)

        bridge.add_done_callback(on_done)
        self._retrieved = True
        self._add_waiter(wake)
        # The settler skips the waiter list when it saw none (see get()): look again.
        if self._published:
            deliver()
        return bridge

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel the awaiter view; kill the token if it has not started.

        asyncio calls this when the task awaiting the token is cancelled (for
        example, the HTTP client went away). A token that has not started is
        killed so no worker time is wasted; an executing token keeps running
        and settles honestly, but awaiters are released at once.

        Thread: the token's event loop (as for any asyncio future).
        """
        if self.done():
            return False
        # Cancel the future first: the kill below settles the token, and a
        # settled future must not also get a TokenKilled nobody will retrieve.
        cancelled = bool(_future_cancel(self, msg))
        self._coordinator._abandon(self)
        return cancelled

    def kill(self, reason: str = "killed by caller") -> KillResult:
        """Kill this token if it has not started: it settles as KILLED and awaiters get ``TokenKilled``.

        An executing token cannot be interrupted; the returned
        :class:`~tokengate.KillResult` says so (``killed`` is False) and the call
        runs to completion. Thread: any.
        """
        return self._coordinator.kill(self._seq, reason=reason)

    def set_result(self, result: Any) -> None:
        """Not allowed: tokens are settled by their coordinator."""
        raise InvalidTransition("tokens are settled by their coordinator; set_result() is not available")

    def set_exception(self, exception: Any) -> None:
        """Not allowed: tokens are settled by their coordinator."""
        raise InvalidTransition("tokens are settled by their coordinator; set_exception() is not available")

    def _resolve_future(self) -> None:
        """Copy the settled outcome into the future. Thread: the token's loop."""
        if self.done():
            return
        if self._is_error:
            try:
                _future_set_exception(self, self._outcome)
            except (TypeError, RuntimeError) as exc:  # an exception the Future refuses (StopIteration)
                self._fail_future(exc)
                return
            # asyncio logs "exception was never retrieved" for futures nobody
            # awaited. Stay quiet when get() (or another loop) is consuming the
            # outcome, and for tokengate's own refusals, which stats record.
            if self._retrieved or self._waiters is not None or isinstance(self._outcome, TokengateError):
                self._log_traceback = False
        else:
            _future_set_result(self, self._outcome)

    def _fail_future(self, cause: BaseException) -> None:
        """Last resort when the outcome cannot be set on the future: set a SettlementFailed. Thread: the token's loop.

        The outcome itself becomes that error too, so ``get()`` and awaiters on
        other loops see the same thing.
        """
        error = SettlementFailed(
            f"token {self.token_id} ({self.operation_type}): its outcome could not be delivered "
            f"({describe_exception(cause)})", token_id=self.token_id)
        error.__cause__ = cause
        self._outcome, self._is_error = error, True
        if not self.done():
            _future_set_exception(self, error)
            self._log_traceback = False

    def _drop_call(self) -> None:
        """Forget the call's function, arguments and context (the token is settled)."""
        self._guarded = None
        self._args = None
        self._kwargs = None
        self._context = None

    # -- the blocking view --------------------------------------------------

    def get(self, timeout: float | None = None) -> R:
        """Block until the token settles and return its result (or raise).

        Raises the function's own exception unchanged, ``TokenKilled``,
        ``TokenTimeout`` or a ``Rejected`` subclass; raises the builtin
        ``TimeoutError`` if *timeout* seconds pass first (the token keeps
        running). Called on a worker thread for a token that has not started
        yet, the token is run inline on this thread, so a call that waits on
        its own children cannot deadlock the pool.

        Raises:
            WouldDeadlock: when called on the event-loop thread that must settle
                the token; use ``await token`` there.
        """
        on_worker = False
        if self._tstate not in _TERMINAL:
            on_worker = self._coordinator._before_blocking_get(self)
        self._retrieved = True
        if not self._published:
            event = threading.Event()
            self._add_waiter(event.set)
            # The settler sets _published before it looks at _waiters, and skips
            # the waiter lock when it sees none; re-checking _published after
            # registering closes that window (sequentially consistent under the GIL).
            if not self._published and not self._wait(event, timeout, on_worker):
                raise TimeoutError(f"token {self.token_id} ({self.operation_type}) did not settle within {timeout}s")
        return self._result_now()

    def _wait(self, event: threading.Event, timeout: float | None, on_worker: bool) -> bool:
        if not on_worker:
            return event.wait(timeout)
        # On a worker thread: wake up now and then to run the token inline if it
        # has become runnable (released by a policy, back from a retry backoff).
        deadline = None if timeout is None else time.monotonic() + timeout
        coordinator = self._coordinator
        while True:
            step = 0.005 if deadline is None else min(0.005, deadline - time.monotonic())
            if step <= 0:
                return event.is_set()
            if event.wait(step):
                return True
            worker = current._worker_local.worker
            if worker is not None and not self._finalized:
                coordinator._try_run_inline(self, worker)

    def _result_now(self) -> R:
        if self._is_error:
            if self.done() and not self.cancelled():
                self._log_traceback = False  # retrieved here, so asyncio must not warn at GC
            raise self._outcome
        if self._tstate is _S.COMPLETED:
            return self._outcome  # type: ignore[no-any-return]
        raise TokenKilled(f"token {self.token_id} settled as {self._tstate.value}", token_id=self.token_id)

    def _add_waiter(self, callback: Callable[[], None]) -> None:
        with _WAITERS_LOCK:
            waiters = self._waiters
            if waiters is not _SETTLED:
                if waiters is None:
                    self._waiters = [callback]
                else:
                    waiters.append(callback)
                return
        callback()  # already settled: call outside the lock

    def _wake_waiters(self) -> None:
        """Release everyone blocked in get() or awaiting from another loop. Thread: any."""
        with _WAITERS_LOCK:
            waiters = self._waiters
            self._waiters = _SETTLED
        if waiters:
            for callback in waiters:
                try:
                    callback()
                except BaseException:  # noqa: BLE001 - one waiter must not keep the others waiting
                    logger.exception("token %s: a settle waiter failed", self.token_id)

    # -- inspection ---------------------------------------------------------

    @property
    def queue_wait(self) -> float | None:
        """Seconds from creation until a worker started it (None if it never started)."""
        if self.started_at is None:
            return None
        return self.started_at - self.created_at

    @property
    def run_time(self) -> float | None:
        """Seconds the function ran on its worker (None until it finished)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the token (safe to call from any thread)."""
        now_perf = time.perf_counter()
        offset = time.time() - now_perf

        def wall(t: float | None) -> float | None:
            return None if t is None else round(t + offset, 6)

        return {
            "token_id": self.token_id,
            "operation_type": self.operation_type,
            "state": self._tstate.value,
            "weight": self.weight,
            "core_id": self.core_id,
            "worker_id": self.worker_id,
            "attempt": self.attempt,
            "created_at": wall(self.created_at),
            "admitted_at": wall(self.admitted_at),
            "started_at": wall(self.started_at),
            "finished_at": wall(self.finished_at),
            "queue_wait": self.queue_wait,
            "run_time": self.run_time,
            "age": now_perf - self.created_at,
            "kill_reason": self.kill_reason,
            "error": None if not self._is_error else describe_exception(self._outcome),
            "tags": {k: _jsonable(v) for k, v in self.tags.items()},
        }

    def __repr__(self) -> str:
        where = f" core={self.core_id}" if self.core_id is not None else ""
        return f"<TaskToken {self.operation_type}#{self._seq} {self._tstate.name}{where} attempt={self.attempt}>"

    # Future subclasses would otherwise compare by identity anyway; keep hashing cheap.
    __hash__ = object.__hash__


_TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):
        return value.value
    if isinstance(value, type):
        return value.__qualname__
    return repr(value)
