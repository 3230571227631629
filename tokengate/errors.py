"""The whole exception vocabulary of tokengate, in one place.

The errors are HTTP-free: ``tokengate_fastapi`` maps them to status codes. Their
attributes are structured so no caller has to parse a message.

Vocabulary (after trio and anyio):

* *you did it*: :class:`ConfigurationError` (bad argument), :class:`CoordinatorNotRunning`.
* *a policy refused the call before it ran*: :class:`Rejected` and its subclasses
  (:class:`Overloaded`, :class:`GateClosed`, :class:`OperationBlocked`,
  :class:`TokenQuarantined`).
* *the call was stopped*: :class:`TokenKilled`, :class:`CoordinatorStopped`,
  :class:`TokenTimeout`.
* *an internal invariant broke*: :class:`InvalidTransition` (should never reach users).

The decorated function's own exception propagates unchanged, with three
exceptions that cannot travel through an ``asyncio.Future`` to an event loop
(see :func:`deliverable_exception`).
"""

from __future__ import annotations

__all__ = [
    "TokengateError",
    "ConfigurationError",
    "CoordinatorNotRunning",
    "Rejected",
    "Overloaded",
    "GateClosed",
    "OperationBlocked",
    "TokenQuarantined",
    "TokenKilled",
    "CoordinatorStopped",
    "TokenTimeout",
    "InvalidTransition",
    "WouldDeadlock",
    "SettlementFailed",
    "describe_exception",
    "deliverable_exception",
    "ProcessLaneError",
    "WorkerCrashed",
    "WorkerTerminated",
    "WorkerStartFailed",
    "PicklingFailed",
    "RemoteError",
    "LaneClosed",
    "NestedCallRefused",
]


class TokengateError(Exception):
    """Base class of every error tokengate raises itself."""


class ConfigurationError(TokengateError, ValueError):
    """Raised when an option, tag or argument is invalid.

    Raised at the moment the value is given (constructor, decoration time),
    never later when it is first used.
    """


class CoordinatorNotRunning(TokengateError, RuntimeError):
    """Raised when a decorated function is called and no coordinator is running.

    Start one first: ``async with OperationsCoordinator():`` in async code, or
    ``coordinator.start()`` from sync code.
    """


class Rejected(TokengateError):
    """Raised when the coordinator refuses a call before it runs.

    The call never ran. ``operation_type`` names the refused operation and
    ``reason`` says why in words.
    """

    def __init__(self, message: str, *, operation_type: str | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.operation_type = operation_type
        self.reason = reason or message


class Overloaded(Rejected):
    """Raised when a weight class's pending queue, or a paused operation's held calls, are at ``max_pending``.

    Back off and retry later; ``retry_after`` is a hint in seconds.
    """

    def __init__(
        self,
        message: str,
        *,
        operation_type: str | None = None,
        weight: str = "",
        pending: int = 0,
        limit: int = 0,
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(message, operation_type=operation_type, reason="overloaded")
        self.weight = weight
        self.pending = pending
        self.limit = limit
        self.retry_after = retry_after


class GateClosed(Rejected):
    """Raised when the coordinator is draining (or stopping) and admits no new calls.

    ``coordinator.resume()`` reopens the gate after a drain.
    """

    def __init__(self, message: str, *, operation_type: str | None = None, retry_after: float = 5.0) -> None:
        super().__init__(message, operation_type=operation_type, reason="draining")
        self.retry_after = retry_after


class OperationBlocked(Rejected):
    """Raised when the operation was auto-blocked by its reputation.

    ``coordinator.unblock(operation_type)`` lifts the block.
    """

    def __init__(self, message: str, *, operation_type: str | None = None, retry_after: float = 30.0) -> None:
        super().__init__(message, operation_type=operation_type, reason="blocked")
        self.retry_after = retry_after


class TokenQuarantined(Rejected):
    """Raised when the call was held for review instead of run.

    ``quarantine_id`` identifies the persisted record; an operator can release
    (re-run) or discard it.
    """

    def __init__(
        self, message: str, *, operation_type: str | None = None, quarantine_id: str = "", trigger: str = ""
    ) -> None:
        super().__init__(message, operation_type=operation_type, reason="quarantined")
        self.quarantine_id = quarantine_id
        self.trigger = trigger


class TokenKilled(TokengateError):
    """Raised to awaiters of a token that was killed before it ran."""

    def __init__(self, message: str, *, token_id: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.token_id = token_id
        self.reason = reason


class CoordinatorStopped(TokenKilled):
    """Raised to awaiters of a token that was still unsettled when its coordinator stopped."""


class TokenTimeout(TokengateError, TimeoutError):
    """Raised to awaiters of a token that did not finish within its ``timeout`` tag.

    A token that timed out before it started never runs. One that was already
    running keeps its thread until the function returns (threads cannot be
    interrupted); its late result is discarded.
    """

    def __init__(self, message: str, *, token_id: str = "", timeout: float = 0.0, started: bool = False) -> None:
        super().__init__(message)
        self.token_id = token_id
        self.timeout = timeout
        self.started = started


class InvalidTransition(TokengateError, RuntimeError):
    """Raised when a token is asked to make a state change its table forbids."""


class SettlementFailed(TokengateError, RuntimeError):
    """Raised to awaiters of a token whose settlement itself failed.

    Should never happen: it means a policy hook or the outcome misbehaved in a
    way tokengate could not absorb (the cause is logged and set as
    ``__cause__``). The token still settles, so nobody waits for ever.
    """

    def __init__(self, message: str, *, token_id: str = "") -> None:
        super().__init__(message)
        self.token_id = token_id


class WouldDeadlock(TokengateError, RuntimeError):
    """Raised by ``TaskToken.get()`` when blocking would deadlock.

    For example, calling ``get()`` on the event-loop thread that must settle the
    token. Use ``await token`` there instead.
    """


# Exceptions a function may raise on a worker thread that must not reach an
# awaiter as they are: StopIteration cannot be set on a Future on CPython < 3.13
# (and breaks generator-based awaiting), and SystemExit / KeyboardInterrupt
# raised inside an awaiting task would stop the event loop, i.e. the server.
# On a worker thread none of them is a signal for the process.
_UNDELIVERABLE = (StopIteration, SystemExit, KeyboardInterrupt)


def deliverable_exception(exc: BaseException) -> BaseException:
    """Return *exc*, or a ``RuntimeError`` standing in for it when it cannot reach an awaiter.

    A decorated function that raises ``StopIteration`` (``next()`` on an empty
    iterator), ``SystemExit`` (``sys.exit()``) or ``KeyboardInterrupt`` settles
    as FAILED with a ``RuntimeError`` whose ``__cause__`` is the original, as
    asyncio does for a coroutine that raises ``StopIteration``. Every other
    exception is returned unchanged.
    """
    if not isinstance(exc, _UNDELIVERABLE):
        return exc
    name = type(exc).__name__
    wrapped = RuntimeError(
        f"the function raised {name}, which cannot be delivered to an awaiter as it is "
        f"(it would {'break the Future protocol' if isinstance(exc, StopIteration) else 'stop the event loop'}); "
        f"the original is this error's __cause__")
    wrapped.__cause__ = exc
    return wrapped


def describe_exception(exc: BaseException) -> str:
    """``"TypeName: message"`` for *exc*, never raising.

    A user's exception may have a ``__str__`` that raises; statistics, logs and
    admin answers must still describe it.
    """
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException:  # noqa: BLE001 - any failure of a user's __str__
        return f"{name}: <str() of the exception failed>"
    return f"{name}: {text}" if text else name


# --- Process lane (tokengate.lanes) -------------------------------------------
# Appended for issue 13. A call on the process lane can fail in ways a thread
# call cannot: its process can die, be stopped on purpose, or the call's data
# can fail to cross the process boundary. Each has its own type.


class ProcessLaneError(TokengateError):
    """Base class of the errors the process lane raises about a call or a worker process."""


class WorkerCrashed(ProcessLaneError, RuntimeError):
    """Raised for a call whose worker process died while running it (or while starting).

    Only that call fails; the handle is replaced before its next call. ``exitcode``
    is the process's exit status (negative: killed by signal ``-exitcode``, named in
    ``signal_name``). The call may have run partly: retry it only if it is idempotent.
    """

    def __init__(
        self, message: str, *, pid: int | None = None, exitcode: int | None = None, signal_name: str | None = None
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal_name = signal_name


class WorkerTerminated(ProcessLaneError):
    """Raised for a call whose worker process was ended on purpose while it ran.

    ``reason`` says why (``"timeout"``, ``"killed"``, ``"stopping"``, or what the
    caller of ``terminate(reason)`` passed). The call did not finish; the handle
    starts a replacement before its next call.
    """

    def __init__(self, message: str, *, pid: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.pid = pid
        self.reason = reason


class WorkerStartFailed(ProcessLaneError, RuntimeError):
    """Raised when a worker process could not be started.

    It exited or timed out before it was ready, or a module it was asked to
    preload failed to import (the child's traceback is in the message).
    """


class PicklingFailed(ProcessLaneError):
    """The outcome of one call whose arguments or result could not cross the process boundary.

    ``direction`` is ``"arguments"`` (nothing ran) or ``"result"`` (the function
    ran; its result could not be sent back). ``type_name`` and ``detail`` name the
    pickling error. The worker process stays usable.
    """

    def __init__(self, message: str, *, direction: str, type_name: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.direction = direction
        self.type_name = type_name
        self.detail = detail


class RemoteError(ProcessLaneError):
    """Stands in for an exception raised in a worker process that could not be sent back as it is.

    The function raised an exception that does not pickle (or does not unpickle
    here). ``type_name`` (``module.QualName``), ``message`` and ``traceback``
    (the child's formatted traceback) describe it.
    """

    def __init__(self, message: str, *, type_name: str = "", remote_message: str = "", traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_message = remote_message
        self.traceback = traceback


class LaneClosed(ProcessLaneError, RuntimeError):
    """Raised when a call reaches a process handle or pool that was closed."""


class NestedCallRefused(CoordinatorNotRunning):
    """Raised when a decorated function is called inside a process-lane worker process.

    A worker process has no coordinator to submit to. Call the plain function
    (``fn.__wrapped__(...)``) to run it inline in that process, or make the
    nested call from the thread lane.
    """
