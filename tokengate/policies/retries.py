"""Retries: run a failed call again, on the SAME token, with capped exponential backoff and full jitter.

Tags (validated at decoration):

* ``retries``: how many times a failed call may run again (an integer from 0
  to 100; 0 or absent = never). A call runs at most ``retries + 1`` times.
* ``retry_backoff``: a number (the base delay in seconds) or a dict
  ``{"base": s, "cap": s}``; default base 0.05 s, cap 5.0 s. The delay before
  attempt ``n + 1`` is ``rng.uniform(0, min(cap, base * 2 ** (n - 1)))``
  (see :func:`compute_backoff`).
* ``retry_on``: an exception class, or a tuple/list of them, that may be
  retried (default ``(Exception,)``). Other exceptions fail the call at once.

What the awaiter sees: nothing until the call is final. ``await token`` (or
``token.get()``) returns the value of the first attempt that succeeds; the
token's ``attempt`` says which one it was. When the retries run out, or the
exception does not match ``retry_on``, the awaiter gets the LAST attempt's
exception, unchanged (the earlier ones are counted, not kept). A retry goes
back through admission like a new call, so it can also end as
``OperationBlocked`` (its operation was blocked meanwhile), ``TokenQuarantined``,
``TokenTimeout`` (the ``timeout`` tag covers every attempt and the waits in
between) or ``TokenKilled``. A call that exhausted its retries carries
``token.policy_data["retries_exhausted"] = True`` for the policies that look
at it in ``on_settle`` (quarantine's poison-call trigger).

Only attempts that ran are retried: a killed or timed-out token never is.
Bounded by construction: the attempt count lives on the token and is capped.

Thread: ``after_run`` and ``on_settle`` run on the coordinator's loop (the
injected ``random.Random`` is only used there); ``stats()`` from any thread.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..errors import ConfigurationError
from ..policy import Policy
from ..states import TokenState
from ..tags import declare_tag

if TYPE_CHECKING:
    from ..policy import PolicyHost
    from ..decorator import GuardedFunction
    from ..token import TaskToken

__all__ = ["Backoff", "RetryPolicy", "compute_backoff", "parse_retries", "parse_retry_backoff", "parse_retry_on",
           "DEFAULT_BACKOFF", "MAX_RETRIES", "EXHAUSTED"]

logger = logging.getLogger(__name__)

MAX_RETRIES = 100
#: Key set to True in ``token.policy_data`` when a call failed with no retries left.
EXHAUSTED = "retries_exhausted"
_MAX_SECONDS = 3600.0


class Backoff(NamedTuple):
    """Normalized ``retry_backoff``: base and cap of the delay, in seconds."""

    base: float
    cap: float


DEFAULT_BACKOFF = Backoff(0.05, 5.0)
_DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (Exception,)


def compute_backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt *attempt* (1-based): full jitter, exponential, capped.

    Returns ``rng.uniform(0, min(cap, base * 2 ** (attempt - 1)))``, so the
    result is always in ``[0, min(cap, base * 2 ** (attempt - 1))]``. Pure:
    the only state is *rng*.

    Raises:
        ConfigurationError: if *attempt* < 1 or *base* / *cap* is negative or not finite.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ConfigurationError(f"attempt must be an integer >= 1, got {attempt!r}")
    for label, value in (("base", base), ("cap", cap)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigurationError(f"{label} must be a finite number of seconds >= 0, got {value!r}")
    # 2.0 ** 1024 overflows; past 2 ** 1000 the cap always wins anyway.
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 1000))
    return rng.uniform(0.0, ceiling)


def parse_retries(value: Any) -> int:
    """An integer from 0 to 100."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"retries must be an integer from 0 to {MAX_RETRIES}, got {value!r}")
    if not 0 <= value <= MAX_RETRIES:
        raise ConfigurationError(f"retries must be from 0 to {MAX_RETRIES}, got {value!r}")
    return value


def _seconds(label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"retry_backoff {label} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not (math.isfinite(seconds) and 0 <= seconds <= _MAX_SECONDS):
        raise ConfigurationError(f"retry_backoff {label} must be from 0 to {_MAX_SECONDS:g} seconds, got {value!r}")
    return seconds


def parse_retry_backoff(value: Any) -> Backoff:
    """A number (base seconds; the cap stays 5.0, or the base if larger) or a dict ``{"base": s, "cap": s}``.

    Missing dict keys take the defaults (base 0.05, cap 5.0). Both must be from
    0 to 3600 seconds, and the cap at least the base.
    """
    if isinstance(value, Backoff):
        value = value._asdict()
    if isinstance(value, dict):
        unknown = sorted(str(k) for k in value if k not in ("base", "cap"))
        if unknown:
            raise ConfigurationError(f"retry_backoff accepts the keys 'base' and 'cap', got unknown {unknown}")
        base = _seconds("base", value.get("base", DEFAULT_BACKOFF.base))
        cap = _seconds("cap", value.get("cap", DEFAULT_BACKOFF.cap))
    else:
        base = _seconds("base", value)
        cap = max(DEFAULT_BACKOFF.cap, base)
    if cap < base:
        raise ConfigurationError(f"retry_backoff cap ({cap:g}s) must be >= base ({base:g}s)")
    return Backoff(base, cap)


def parse_retry_on(value: Any) -> tuple[type[BaseException], ...]:
    """An Exception subclass, or a non-empty tuple/list of them."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items:
        raise ConfigurationError("retry_on must name at least one exception class, got an empty sequence")
    for item in items:
        if not (isinstance(item, type) and issubclass(item, Exception)):
            raise ConfigurationError(
                f"retry_on must be an Exception subclass or a tuple of them, got {item!r}"
                " (BaseException-only types such as KeyboardInterrupt are never retried)")
    return items


declare_tag("retries", "retries", parse_retries,
            f"times a failed call runs again, 0..{MAX_RETRIES} (tokengate.policies.retries)")
declare_tag("retry_backoff", "retries", parse_retry_backoff,
            "base seconds, or {'base': s, 'cap': s}: capped exponential backoff with full jitter")
declare_tag("retry_on", "retries", parse_retry_on,
            "exception class or tuple of classes that may be retried (default: Exception)")


class _Counts:
    __slots__ = ("scheduled", "succeeded_after_retry", "exhausted", "not_retryable", "ended_in_retry")

    def __init__(self) -> None:
        self.scheduled = 0  # retries scheduled (one per failed attempt that will run again)
        self.succeeded_after_retry = 0  # calls that succeeded on attempt >= 2
        self.exhausted = 0  # calls that failed with no retries left
        self.not_retryable = 0  # failures whose exception did not match retry_on
        self.ended_in_retry = 0  # calls settled between attempts (blocked, quarantined, timed out, killed)

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class RetryPolicy(Policy):
    """Retries failed attempts of functions tagged ``retries``; the original token gets the final outcome.

    Args:
        rng: The random source for jitter (default: a private ``random.Random()``).
            Pass ``random.Random(seed)`` for reproducible delays.
        max_operations: Operation types with their own counters at most; past
            it the least recently used is forgotten (default 10,000).

    Raises:
        ConfigurationError: for an invalid option, at construction.
    """

    name: ClassVar[str] = "retries"

    def __init__(self, *, rng: random.Random | None = None, max_operations: int = 10_000) -> None:
        if rng is not None and not isinstance(rng, random.Random):
            raise ConfigurationError(f"rng must be a random.Random, got {type(rng).__name__} {rng!r}")
        if isinstance(max_operations, bool) or not isinstance(max_operations, int) or max_operations < 1:
            raise ConfigurationError(f"max_operations must be a positive integer, got {max_operations!r}")
        self._rng = rng if rng is not None else random.Random()
        self.max_operations = max_operations
        self._lock = threading.Lock()  # guards _total, _ops and _evicted (written on the loop, read anywhere)
        self._total = _Counts()
        self._ops: collections.OrderedDict[str, _Counts] = collections.OrderedDict()
        self._evicted = 0
        self._coordinator: PolicyHost | None = None

    def on_start(self, coordinator: PolicyHost) -> None:
        self._coordinator = coordinator

    def interested(self, guarded: GuardedFunction[..., Any]) -> bool:
        tags = guarded.tags
        if tags.get("retries", 0) > 0:
            return True
        if "retry_backoff" in tags or "retry_on" in tags:
            logger.warning("%s has retry_backoff/retry_on tags but no retries; it will not be retried",
                           guarded.operation_type)
        return False

    # -- hooks ------------------------------------------------------------------

    def after_run(self, token: TaskToken[Any]) -> float | None:
        """Return a delay to run the token again if its attempt failed retryably; else None. Thread: loop."""
        attempt = token.attempt
        if not token.is_error:
            if attempt > 1:
                self._count(token.operation_type, "succeeded_after_retry")
            return None
        tags = token.tags
        retryable = isinstance(token.outcome, tags.get("retry_on", _DEFAULT_RETRY_ON))
        if not retryable:
            self._count(token.operation_type, "not_retryable")
            return None
        if attempt > tags["retries"]:
            data = token.policy_data
            if data is None:
                data = token.policy_data = {}
            data[EXHAUSTED] = True
            self._count(token.operation_type, "exhausted")
            return None
        coordinator = self._coordinator
        if coordinator is not None and not coordinator.running:
            # Stopping: the coordinator schedules no retry now, so none is counted; the failure is final.
            return None
        backoff: Backoff = tags.get("retry_backoff", DEFAULT_BACKOFF)
        self._count(token.operation_type, "scheduled")
        return compute_backoff(attempt, backoff.base, backoff.cap, self._rng)

    def on_settle(self, token: TaskToken[Any]) -> None:
        """Count calls that ended between attempts (refused or stopped on their way back). Thread: loop."""
        if token.attempt > 1 and token.state not in _RAN:
            self._count(token.operation_type, "ended_in_retry")

    def _count(self, op: str, field: str) -> None:
        with self._lock:
            setattr(self._total, field, getattr(self._total, field) + 1)
            counts = self._ops.get(op)
            if counts is None:
                counts = self._ops[op] = _Counts()
                if len(self._ops) > self.max_operations:
                    self._ops.popitem(last=False)
                    self._evicted += 1
            else:
                self._ops.move_to_end(op)
            setattr(counts, field, getattr(counts, field) + 1)

    # -- statistics -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Totals and per-operation counts of scheduled, succeeded-after-retry, exhausted... Thread: any."""
        with self._lock:
            return {
                **self._total.to_dict(),
                "operations": {op: c.to_dict() for op, c in self._ops.items()},
                "operations_tracked": len(self._ops),
                "max_operations": self.max_operations,
                "evicted_operations": self._evicted,
            }


_RAN = frozenset({TokenState.COMPLETED, TokenState.FAILED})
