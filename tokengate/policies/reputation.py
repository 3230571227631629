"""Guard House: a reputation per operation type, and an optional auto-block.

Per ``operation_type`` (not the function's ``__name__``, so same-named
functions of different modules never merge) the policy counts attempts,
successes, failures by exception type, timeouts and kills, keeps recent run
times in a bounded reservoir, and classifies the operation's health:

================  =====================================================
``UNKNOWN``       fewer than 5 attempts
``EXCELLENT``     completion rate >= 95 %
``HEALTHY``       >= 80 %
``AT_RISK``       >= 50 %
``PROBLEMATIC``   below 50 %
================  =====================================================

An *attempt* is one run of the function (each retry is its own attempt) or a
call that settled as ``TIMEOUT`` (it failed to complete, whether or not it
had started). ``KILLED`` calls (an operator, a cancelled awaiter, a stop) are
counted as ``kills`` but are not attempts: they say nothing about the
operation. Refused calls are not attempts either.

Not every exception is the operation's fault: a validation error raised for
bad input from an anonymous caller says nothing about the operation, and with
``auto_block=True`` a handful of such callers would block it for everyone.
``ignore`` names exception types that are the caller's fault, ``count_on`` the
only types that are the operation's (both: an exception is counted when it
matches ``count_on`` and not ``ignore``). A run that ends in an exception not
counted is not an attempt either: it enters neither the counts nor the failure
window nor the run times, and is shown as ``ignored`` (by type in
``ignored_by_type``). Timeouts and kills are never ignored: no exception of
the function's own ends them.

Passive by default: it only observes. With ``auto_block=True``, an operation
whose failure rate over its most recent ``block_window`` attempts reaches
``block_threshold`` (with at least ``block_min_attempts`` of them) is blocked:
its new calls (and retries of earlier ones) are refused with
:class:`~tokengate.errors.OperationBlocked` until someone calls
``unblock(operation_type)``. Blocks and unblocks are logged at WARNING.

Memory is bounded: at most ``max_operations`` operation types are tracked;
past that the least recently seen one is forgotten (its block, if any, stays).

Thread: ``after_run`` and ``on_settle`` run on the coordinator's loop (a call
refused at submission settles on its submitting thread), ``before_submit`` on
the submitting thread; ``block``, ``unblock``, ``reputation`` and ``stats`` on
any thread. One lock guards everything; logging happens after releasing it.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Deque

from ..errors import ConfigurationError, OperationBlocked
from ..metrics import Reservoir
from ..policy import Policy
from ..states import TokenState

if TYPE_CHECKING:
    from ..policy import PolicyHost
    from ..token import TaskToken

__all__ = ["Health", "ReputationPolicy", "classify_health"]

logger = logging.getLogger(__name__)

_MAX_ERROR_TYPES = 32  # distinct exception type names kept per operation; the rest count as "<other>"


_FOLD_EVERY = 1024  # fold the successes recorded lock-free at least this often


class Health(str, enum.Enum):
    """The health class of an operation; the value is the lowercase name."""

    UNKNOWN = "unknown"
    EXCELLENT = "excellent"
    HEALTHY = "healthy"
    AT_RISK = "at_risk"
    PROBLEMATIC = "problematic"


def classify_health(attempts: int, successes: int) -> Health:
    """Health from counts: < 5 attempts UNKNOWN; completion >= 95 % EXCELLENT, >= 80 % HEALTHY, >= 50 % AT_RISK."""
    if attempts < 5:
        return Health.UNKNOWN
    # Integer arithmetic: no float rounding at the exact boundaries (19 of 20 is 95 %).
    if successes * 100 >= attempts * 95:
        return Health.EXCELLENT
    if successes * 100 >= attempts * 80:
        return Health.HEALTHY
    if successes * 100 >= attempts * 50:
        return Health.AT_RISK
    return Health.PROBLEMATIC


class _Operation:
    """Counters of one operation type. Guarded by the policy's lock."""

    __slots__ = ("attempts", "successes", "failures", "errors", "timeouts", "kills", "refused", "ignored",
                 "ignored_errors", "run_time", "min_run", "first_seen", "last_seen", "window", "window_failures")

    def __init__(self, now: float, reservoir_size: int, window: int) -> None:
        self.attempts = 0
        self.successes = 0
        self.failures = 0
        self.errors: dict[str, int] = {}
        self.timeouts = 0
        self.kills = 0
        self.refused = 0  # calls refused because the operation was blocked
        self.ignored = 0  # runs that raised an exception the policy does not count (ignore / count_on)
        self.ignored_errors: dict[str, int] = {}
        self.run_time = Reservoir(reservoir_size)
        self.min_run: float | None = None
        self.first_seen = now
        self.last_seen = now
        self.window: Deque[bool] = collections.deque(maxlen=window)  # True = failed
        self.window_failures = 0

    def reset_window(self) -> None:
        self.window.clear()
        self.window_failures = 0


class ReputationPolicy(Policy):
    """Tracks each operation's reputation; optionally blocks operations that keep failing.

    Args:
        auto_block: Block an operation when its recent failure rate reaches
            the threshold (default False: observe only).
        block_threshold: Failure rate in (0, 1] that blocks (default 0.9).
        block_window: How many recent attempts the rate is computed over (default 20).
        block_min_attempts: Attempts the window must hold before it may block
            (default 10; at most ``block_window``).
        max_operations: Operation types tracked at most; the least recently
            seen is forgotten past it (default 10,000).
        reservoir_size: Recent run times kept per operation for mean and p95 (default 100).
        clock: Wall-clock seconds for ``first_seen``/``last_seen`` (injectable for tests).
        ignore: An exception class, or a tuple/list of them, whose instances
            raised by the function are the caller's fault (say, a validation
            error): not counted as attempts or failures, never a reason to
            block. Default: none.
        count_on: An exception class, or a tuple/list of them: only failures
            matching one of them count (``ignore`` still wins). Default None:
            every exception counts.

    Raises:
        ConfigurationError: for any invalid option, at construction.
    """

    name: ClassVar[str] = "reputation"

    def __init__(
        self,
        *,
        auto_block: bool = False,
        block_threshold: float = 0.9,
        block_window: int = 20,
        block_min_attempts: int = 10,
        max_operations: int = 10_000,
        reservoir_size: int = 100,
        clock: Callable[[], float] = time.time,
        ignore: type[BaseException] | tuple[type[BaseException], ...] | list[type[BaseException]] = (),
        count_on: type[BaseException] | tuple[type[BaseException], ...] | list[type[BaseException]] | None = None,
    ) -> None:
        if not isinstance(auto_block, bool):
            raise ConfigurationError(f"auto_block must be True or False, got {auto_block!r}")
        if (isinstance(block_threshold, bool) or not isinstance(block_threshold, (int, float))
                or not (0 < block_threshold <= 1)):
            raise ConfigurationError(f"block_threshold must be a failure rate in (0, 1], got {block_threshold!r}")
        _check_int("block_window", block_window, 1, 100_000)
        _check_int("block_min_attempts", block_min_attempts, 1, block_window)
        _check_int("max_operations", max_operations, 1, 10_000_000)
        _check_int("reservoir_size", reservoir_size, 16, 100_000)
        if not callable(clock):  # else every recorded attempt fails later, far from the cause
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}")
        self.ignore = _exception_types("ignore", ignore, allow_empty=True)
        self.count_on = None if count_on is None else _exception_types("count_on", count_on, allow_empty=False)
        self.auto_block = auto_block
        self.block_threshold = float(block_threshold)
        self.block_window = block_window
        self.block_min_attempts = block_min_attempts
        self.max_operations = max_operations
        self.reservoir_size = reservoir_size
        self._clock = clock
        # Guards _ops, _blocked and every _Operation. Never held while logging or calling user code.
        self._lock = threading.Lock()
        # Successful attempts are recorded here without the lock: the loop
        # thread (the only writer) appends the run time to its operation's
        # deque. Folds apply them to the rows in bulk, under the lock: when a
        # row is read, before any other outcome is counted (so each window and
        # the LRU order keep attempt order), and every _FOLD_EVERY successes.
        # The hot path stays one dict lookup and one append.
        self._unfolded: collections.OrderedDict[str, Deque[float]] = collections.OrderedDict()
        self._unfolded_count = 0
        self._last_op: str | None = None  # the operation at the end of _unfolded
        self._ops: collections.OrderedDict[str, _Operation] = collections.OrderedDict()  # LRU order
        # operation_type -> why it is blocked. Read without the lock on the hot path (a dict lookup is atomic).
        self._blocked: dict[str, str] = {}
        self._evicted = 0
        self._coordinator: PolicyHost | None = None

    def on_start(self, coordinator: PolicyHost) -> None:
        """Bind to *coordinator* (loop thread). One instance serves one coordinator.

        Its successes are recorded by one writer, the coordinator's loop thread:
        an instance shared by two running coordinators would have two.
        """
        if self._coordinator is not None and self._coordinator is not coordinator and self._coordinator.running:
            logger.error("ReputationPolicy instance is shared by coordinators %r and %r; give each its own "
                         "(its counts are not safe with two writers)", self._coordinator.name, coordinator.name)
        self._coordinator = coordinator

    # -- hooks ------------------------------------------------------------------

    def before_submit(self, token: TaskToken[Any]) -> None:
        """Refuse a call (or a retry) of a blocked operation with OperationBlocked. Thread: submitter or loop."""
        if not self._blocked:
            return
        op = token.operation_type
        reason = self._blocked.get(op)
        if reason is None:
            return
        with self._lock:
            entry = self._ops.get(op)
            if entry is not None:
                entry.refused += 1
        raise OperationBlocked(
            f"operation {op!r} is blocked ({reason}); fix the cause, then call "
            f"coordinator.policy('reputation').unblock({op!r})",
            operation_type=op,
        )

    def after_run(self, token: TaskToken[Any]) -> float | None:
        """Record one attempt that ran (success or failure, with its run time). Thread: loop."""
        op = token.operation_type
        started, finished = token.started_at, token.finished_at
        if token.is_error and not self._counts(token.outcome):
            self._record_ignored(op, type(token.outcome).__name__)
            return None
        if token.is_error or started is None or finished is None:
            error_type = type(token.outcome).__name__ if token.is_error else None
            run_time = None if started is None or finished is None else finished - started
            self._record(op, token.is_error, error_type, run_time)
            return None
        # A success cannot block an operation, so it needs no lock and no check now.
        unfolded = self._unfolded
        if op is self._last_op:
            unfolded[op].append(finished - started)
        else:
            # Move the operation to the end (one C call, so a reader's copy never
            # misses it): the table stays in order of each operation's latest
            # attempt, the LRU order the fold keeps.
            runs = unfolded.get(op)
            if runs is None:
                runs = unfolded[op] = collections.deque()
            else:
                unfolded.move_to_end(op)
            self._last_op = op
            runs.append(finished - started)
        self._unfolded_count += 1
        if self._unfolded_count >= _FOLD_EVERY:
            self._fold(writer=True)
        return None

    def _counts(self, exc: object) -> bool:
        """Is a run that raised *exc* the operation's fault (see ``ignore`` and ``count_on``)?"""
        if self.ignore and isinstance(exc, self.ignore):
            return False
        count_on = self.count_on
        return count_on is None or isinstance(exc, count_on)

    def _record_ignored(self, op: str, error_type: str) -> None:
        """Count a run that raised an exception that is not the operation's fault: not an attempt. Thread: loop."""
        with self._lock:
            self._fold_locked(writer=True)  # earlier successes first: see _record
            entry = self._entry(op)
            entry.ignored += 1
            _count_type(entry.ignored_errors, error_type)

    def _fold(self, writer: bool = False) -> None:
        """Apply the successes recorded lock-free since the last fold. Thread: any.

        *writer*: called by the loop thread's ``after_run`` (the only thread
        that appends), which may then swap in a fresh table, so operations no
        longer called do not keep a deque. Another thread only pops what is
        there: appends racing with it wait for the next fold, never get lost.
        Operations are touched in the order of their latest attempt, so the
        LRU order is what attempt-by-attempt recording gives.
        """
        with self._lock:
            self._fold_locked(writer)

    def _fold_locked(self, writer: bool) -> None:
        """The fold itself (see ``_fold``). Caller holds the lock."""
        pending: dict[str, Deque[float]]
        if writer:
            pending, self._unfolded = self._unfolded, collections.OrderedDict()
            self._unfolded_count = 0
            self._last_op = None
        else:
            pending = dict(self._unfolded)
        for op, runs in pending.items():
            if runs:
                # No eviction until the batch is in: a new operation of the batch must not
                # evict one whose own successes (some older than it) are still to come.
                self._apply_successes(self._entry(op, evict=False), runs)
        self._evict()

    @staticmethod
    def _apply_successes(entry: _Operation, runs: Deque[float]) -> None:
        """Count the successful attempts whose run times wait in *runs*, oldest first. Caller holds the lock."""
        pop = runs.popleft
        taken = [pop() for _ in range(len(runs))]  # appends racing with this stay for the next fold
        k = len(taken)
        entry.attempts += k
        entry.successes += k
        entry.run_time.samples.extend(taken)
        entry.run_time.count += k
        fastest = min(taken)
        if entry.min_run is None or fastest < entry.min_run:
            entry.min_run = fastest
        # The failure window gains k False entries; count the failures they push out.
        window = entry.window
        cap = window.maxlen or 0
        evicted = min(len(window), len(window) + k - cap)
        if evicted > 0:
            entry.window_failures -= sum(itertools.islice(window, evicted))
        window.extend(itertools.repeat(False, min(k, cap)))

    # Completed and failed attempts are recorded by after_run (called for every
    # attempt, even while stopping); only these outcomes never reach it.
    settle_states = frozenset({TokenState.TIMEOUT, TokenState.KILLED})

    def on_settle(self, token: TaskToken[Any]) -> None:
        """Record outcomes that never reach after_run: TIMEOUT (an attempt) and KILLED. Thread: loop."""
        state = token.state
        if state is TokenState.TIMEOUT:
            self._record(token.operation_type, True, None, None, timeout=True)
        elif state is TokenState.KILLED:
            with self._lock:
                self._fold_locked(writer=True)  # earlier successes first: see _record
                self._entry(token.operation_type).kills += 1

    # -- recording ---------------------------------------------------------------

    def _entry(self, op: str, *, evict: bool = True) -> _Operation:
        """The counters of *op*, created if new, marked most recently seen. Caller holds the lock.

        *evict* False leaves the table over ``max_operations`` until ``_evict()`` (a fold).
        """
        now = self._clock()
        ops = self._ops
        entry = ops.get(op)
        if entry is None:
            entry = ops[op] = _Operation(now, self.reservoir_size, self.block_window)
            if evict:
                self._evict()
        else:
            ops.move_to_end(op)
            entry.last_seen = now
        return entry

    def _evict(self) -> None:
        """Forget the least recently seen operations past ``max_operations``. Caller holds the lock."""
        ops = self._ops
        while len(ops) > self.max_operations:
            ops.popitem(last=False)
            self._evicted += 1

    def _record(self, op: str, failed: bool, error_type: str | None, run_time: float | None,
                *, timeout: bool = False) -> None:
        """Count one attempt at once (a failure, a timeout, a run without times) and check the block. Thread: loop."""
        blocked_now: str | None = None
        with self._lock:
            # Every success recorded before this attempt is counted first, not only
            # this operation's: else the rows touched now would look more recent
            # than operations seen just before them, and the LRU would evict those
            # (losing their counts). Thread: loop, the writer, so it may swap.
            self._fold_locked(writer=True)
            entry = self._entry(op)
            self._apply(entry, failed, error_type, run_time, timeout)
            if self.auto_block and op not in self._blocked:
                seen = len(entry.window)
                rate = entry.window_failures / seen
                if seen >= self.block_min_attempts and rate >= self.block_threshold:
                    blocked_now = (f"auto-blocked: {entry.window_failures} of its last {seen} attempts failed "
                                   f"({rate:.0%} >= {self.block_threshold:.0%})")
                    self._blocked[op] = blocked_now
        if blocked_now is not None:
            logger.warning("reputation: operation %r %s; new calls are refused until unblock(%r)",
                           op, blocked_now, op)

    @staticmethod
    def _apply(entry: _Operation, failed: bool, error_type: str | None, run_time: float | None,
               timeout: bool) -> None:
        """Count one attempt in *entry* (successes in bulk go through ``_apply_successes``). Caller holds the lock."""
        entry.attempts += 1
        if timeout:
            entry.timeouts += 1
        elif failed:
            entry.failures += 1
            _count_type(entry.errors, error_type or "<unknown>")
        else:
            entry.successes += 1
        if run_time is not None:
            entry.run_time.add(run_time)
            if entry.min_run is None or run_time < entry.min_run:
                entry.min_run = run_time
        # The failure window (a bounded deque of booleans, True = failed).
        window = entry.window
        if len(window) == window.maxlen and window[0]:
            entry.window_failures -= 1
        window.append(failed)
        if failed:
            entry.window_failures += 1

    # -- control -----------------------------------------------------------------

    def block(self, operation_type: str, reason: str = "blocked by operator") -> bool:
        """Refuse new calls of *operation_type* until ``unblock``; return False if it was already blocked.

        Thread: any.
        """
        self._fold()
        _check_op(operation_type)
        with self._lock:
            if operation_type in self._blocked:
                return False
            self._blocked[operation_type] = reason
        logger.warning("reputation: operation %r blocked (%s); new calls are refused until unblock(%r)",
                       operation_type, reason, operation_type)
        return True

    def unblock(self, operation_type: str) -> bool:
        """Accept calls of *operation_type* again; return False if it was not blocked.

        Also clears the operation's recent-attempt window, so the failures that
        caused an auto-block do not block it again at the next attempt. The
        lifetime counters are kept. Thread: any.
        """
        self._fold()
        _check_op(operation_type)
        with self._lock:
            was = self._blocked.pop(operation_type, None)
            entry = self._ops.get(operation_type)
            if entry is not None:
                entry.reset_window()
        if was is None:
            return False
        logger.warning("reputation: operation %r unblocked (was: %s)", operation_type, was)
        return True

    def blocked(self) -> list[str]:
        """The blocked operation types, sorted. Thread: any."""
        self._fold()
        with self._lock:
            return sorted(self._blocked)

    def is_blocked(self, operation_type: str) -> bool:
        """True while *operation_type* is blocked. Thread: any."""
        self._fold()
        return operation_type in self._blocked

    # -- inspection ----------------------------------------------------------------

    def reputation(self, operation_type: str | None = None) -> list[dict[str, Any]]:
        """JSON-ready rows, one per tracked operation (most recently seen first), or just *operation_type*'s.

        An operation that is not tracked gives ``[]``. Thread: any.
        """
        self._fold()
        with self._lock:
            if operation_type is not None:
                entry = self._ops.get(operation_type)
                return [] if entry is None else [self._row(operation_type, entry)]
            items = list(reversed(self._ops.items()))
        return self._rows(items)

    def _rows(self, items: list[tuple[str, _Operation]]) -> list[dict[str, Any]]:
        # The lock is taken per row, so a long listing never stalls the loop's after_run for long.
        rows = []
        for op, entry in items:
            with self._lock:
                rows.append(self._row(op, entry))
        return rows

    def _row(self, op: str, e: _Operation) -> dict[str, Any]:
        """One operation's row. Caller holds the lock."""
        summary = e.run_time.summary()
        seen = len(e.window)
        return {
            "operation_type": op,
            "health": classify_health(e.attempts, e.successes).value,
            "attempts": e.attempts,
            "successes": e.successes,
            "failures": e.failures,
            "failures_by_type": dict(e.errors),
            "timeouts": e.timeouts,
            "kills": e.kills,
            "refused_while_blocked": e.refused,
            "ignored": e.ignored,
            "ignored_by_type": dict(e.ignored_errors),
            "completion_rate": (e.successes / e.attempts) if e.attempts else None,
            "recent_failure_rate": (e.window_failures / seen) if seen else None,
            "recent_attempts": seen,
            # min is over every run; mean and p95 over the most recent `reservoir_size` runs.
            "run_time": {"min": e.min_run, "mean": summary["mean"], "p95": summary["p95"], "max": summary["max"],
                         "samples": summary["window"]},
            "first_seen": e.first_seen,
            "last_seen": e.last_seen,
            "blocked": op in self._blocked,
        }

    def stats(self) -> dict[str, Any]:
        """Totals, the health distribution, blocks and the per-operation rows. Thread: any.

        ``operations`` holds at most ``max_operations`` rows (the least
        recently seen are evicted; ``evicted_operations`` counts them).
        """
        self._fold()
        with self._lock:
            distribution = {h.value: 0 for h in Health}
            for entry in self._ops.values():
                distribution[classify_health(entry.attempts, entry.successes).value] += 1
            head = {
                "auto_block": self.auto_block,
                "block_threshold": self.block_threshold,
                "block_window": self.block_window,
                "block_min_attempts": self.block_min_attempts,
                "ignore": [_type_name(t) for t in self.ignore],
                "count_on": None if self.count_on is None else [_type_name(t) for t in self.count_on],
                "blocked": dict(sorted(self._blocked.items())),
                "operations_tracked": len(self._ops),
                "max_operations": self.max_operations,
                "evicted_operations": self._evicted,
                "health_distribution": distribution,
            }
            items = list(reversed(self._ops.items()))
        head["operations"] = {row["operation_type"]: row for row in self._rows(items)}
        return head


def _count_type(counts: dict[str, int], key: str) -> None:
    """Add one to *key* in a bounded per-type table (past ``_MAX_ERROR_TYPES`` names it is "<other>")."""
    if key not in counts and len(counts) >= _MAX_ERROR_TYPES:
        key = "<other>"
    counts[key] = counts.get(key, 0) + 1


def _type_name(tp: type) -> str:
    return f"{tp.__module__}.{tp.__qualname__}"


def _exception_types(name: str, value: object, *, allow_empty: bool) -> tuple[type[BaseException], ...]:
    """Normalize an exception class or a tuple/list of them; raise ConfigurationError naming *name*."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not items and not allow_empty:
        raise ConfigurationError(f"{name} must name at least one exception class (an empty {name} would never "
                                 "count a failure; leave it None to count every exception)")
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            hint = " (pass the class itself, not its name)" if isinstance(item, str) else ""
            raise ConfigurationError(
                f"{name} must be an exception class or a tuple/list of them, got {item!r}{hint}")
    return items


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _check_op(operation_type: object) -> None:
    if not isinstance(operation_type, str) or not operation_type:
        raise ConfigurationError(f"operation_type must be a non-empty string, got {operation_type!r}")
