"""Convergence: adapt each core's active worker count ("pattern") to measured load.

A core's *pattern* is how many of its ``workers_per_core`` threads take new
tokens (``coordinator.set_active_workers``). :class:`ConvergencePolicy` runs a
background task on the coordinator's event loop that, every ``interval``
seconds, reads per-core signals from ``coordinator.stats()`` and moves each
core's pattern by at most one worker:

* **up** when the core has a backlog -- work waiting for it and either more
  waiting tokens than active workers, a busy ratio above ``scale_up_busy``, or
  a queue-wait p90 above ``scale_up_wait`` -- for ``hysteresis`` cycles in a
  row (the blocking-I/O case: every active worker is parked in a slow call);
* **down** when the core is mostly idle -- nothing waiting and a busy ratio
  below ``scale_down_busy`` -- for ``hysteresis`` cycles in a row.

Any other cycle resets both streaks, and a change resets them too, so a core
moves at most one step per ``hysteresis`` cycles and alternating signals never
make it flap. Every core starts at the configured ``workers_per_core`` (the
coordinator's default), so convergence only trims idle cores and grows them
back under a backlog; it never goes below ``min_active`` or above
``workers_per_core``.

Why it never changes results: a pattern only decides which workers take *new*
tokens. Tokens already in a deactivated worker's mailbox still run there, and
nothing is dropped, reordered within a mailbox or re-run.

Signals and their honest limits (see :func:`read_signals`):

* ``waiting``: tokens in the core's mailboxes + tokens pinned to it + the
  pending queue of every weight class the core serves (ignored while
  admission is paused, since more workers would not help);
* ``busy_ratio``: worker busy-time added since the last cycle over
  ``elapsed x active``, or the share of active workers busy right now if that
  is higher (a worker's busy time is only credited when its call finishes, so
  a long blocking call shows up in the instantaneous share first);
* ``queue_wait_p90``: the coordinator-wide creation-to-start p90 over its
  recent-sample reservoir (there is no per-core view yet).

The decision itself is the pure function :func:`decide`, tested directly; the
loop is driven in tests by calling :meth:`ConvergencePolicy.step`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Deque, Mapping, NamedTuple, Protocol

from .clock import Clock, MonotonicClock
from .errors import ConfigurationError, CoordinatorNotRunning
from .policy import Policy, PolicyHost

__all__ = [
    "ConvergenceChange",
    "ConvergenceConfig",
    "ConvergencePolicy",
    "ConvergenceTarget",
    "CoreSignals",
    "CoreState",
    "Decision",
    "decide",
    "read_signals",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvergenceConfig:
    """Thresholds of :func:`decide`; validated by :class:`ConvergencePolicy`."""

    min_active: int = 1
    scale_up_wait: float = 0.05
    scale_up_busy: float = 0.9
    scale_down_busy: float = 0.25
    hysteresis: int = 2


@dataclass(frozen=True)
class CoreSignals:
    """What one cycle measured on one core (inputs of :func:`decide`)."""

    core_id: int
    active: int
    max_active: int
    waiting: int
    busy_workers: int
    busy_ratio: float
    completed: int
    queue_wait_p90: float | None


@dataclass(frozen=True)
class CoreState:
    """Consecutive cycles of backlog (``up``) and idleness (``down``) seen on one core."""

    up: int = 0
    down: int = 0


class Decision(NamedTuple):
    """Result of :func:`decide`: the pattern to apply, why (empty if unchanged), the next state."""

    active: int
    reason: str
    state: CoreState


def decide(signals: CoreSignals, state: CoreState, config: ConvergenceConfig) -> Decision:
    """Decide one core's next active worker count from one cycle's signals. Pure.

    Returns ``Decision(active, reason, state)``: ``active == signals.active``
    and ``reason == ""`` when nothing changes; ``state`` carries the streaks to
    pass to the next call for this core.
    """
    s, h = signals, config.hysteresis
    low = min(config.min_active, s.max_active)
    wait_high = s.queue_wait_p90 is not None and s.queue_wait_p90 > config.scale_up_wait
    backlog = s.waiting > 0 and (s.waiting > s.active or s.busy_ratio > config.scale_up_busy or wait_high)
    idle = s.waiting == 0 and s.busy_ratio < config.scale_down_busy
    up = state.up + 1 if backlog else 0
    down = state.down + 1 if idle else 0
    if up >= h and s.active < s.max_active:
        wait = "n/a" if s.queue_wait_p90 is None else f"{s.queue_wait_p90:.3f}s"
        return Decision(s.active + 1, (
            f"backlog for {up} cycles: {s.waiting} waiting for {s.active} active workers, "
            f"busy {s.busy_ratio:.0%}, queue wait p90 {wait}"), CoreState())
    if down >= h and s.active > low:
        return Decision(s.active - 1, (
            f"idle for {down} cycles: nothing waiting, busy {s.busy_ratio:.0%} "
            f"< {config.scale_down_busy:.0%}"), CoreState())
    # Cap the streaks: a core pinned at its limit must not build up credit.
    return Decision(s.active, "", CoreState(min(up, h), min(down, h)))


class _Prev(NamedTuple):
    at: float
    busy_time: float
    executed: int


def read_signals(
    stats: Mapping[str, Any], prev: Mapping[int, _Prev], now: float
) -> tuple[list[CoreSignals], dict[int, _Prev]]:
    """Turn one ``coordinator.stats()`` snapshot into per-core signals. Pure.

    *prev* is what the previous call returned for each core (empty at first);
    the busy ratio and completion count are deltas since then.
    """
    paused = bool(stats.get("paused"))
    pending: Mapping[str, int] = stats.get("pending") or {}
    allowed: Mapping[str, list[int]] = (stats.get("routing") or {}).get("allowed") or {}
    wait_p90 = (stats.get("queue_wait") or {}).get("p90")
    signals: list[CoreSignals] = []
    nxt: dict[int, _Prev] = {}
    for core in stats.get("cores") or ():
        cid = int(core["core_id"])
        workers = core.get("workers") or ()
        max_active = len(workers) or int(core["active_workers"])
        active = max(1, int(core["active_workers"]))
        busy_time = sum(float(w["busy_time"]) for w in workers)
        executed = sum(int(w["executed"]) for w in workers)
        busy_now = int(core["busy_workers"])
        ratio = min(1.0, busy_now / active)
        completed = 0
        before = prev.get(cid)
        if before is not None and now > before.at:
            ratio = max(ratio, min(1.0, (busy_time - before.busy_time) / ((now - before.at) * active)))
            completed = max(0, executed - before.executed)
        waiting = int(core["queue_depth"]) + int(core.get("pinned_pending", 0))
        if paused:
            waiting = 0  # nothing moves while paused: more workers would not help
        else:
            waiting += sum(int(n) for w, n in pending.items() if cid in allowed.get(w, ()))
        signals.append(CoreSignals(cid, active, max_active, waiting, busy_now, max(0.0, ratio), completed,
                                   None if wait_p90 is None else float(wait_p90)))
        nxt[cid] = _Prev(now, busy_time, executed)
    return signals, nxt


@dataclass(frozen=True)
class ConvergenceChange:
    """One applied pattern change."""

    time: float
    core: int
    from_active: int
    to_active: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConvergenceTarget(Protocol):
    """What convergence needs from a coordinator (tests pass a fake)."""

    @property
    def workers_per_core(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def set_active_workers(self, core_id: int, active: int) -> None: ...


class ConvergencePolicy(Policy):
    """Adjust every core's active worker count from measured load, with hysteresis. Opt-in.

    Args:
        interval: Seconds between cycles of the background task (> 0).
        clock: Time source for busy-ratio deltas and change stamps
            (default :class:`~tokengate.clock.MonotonicClock`). The cadence
            itself is ``asyncio.sleep(interval)`` on the coordinator's loop.
        min_active: Lowest pattern a core is trimmed to (>= 1; capped at
            ``workers_per_core``).
        scale_up_wait: Queue-wait p90 (seconds) that counts as a backlog when
            work is waiting.
        scale_up_busy: Busy ratio above which waiting work counts as a backlog.
        scale_down_busy: Busy ratio below which an empty core counts as idle
            (must be below ``scale_up_busy``).
        hysteresis: Consecutive cycles a condition must hold before a change.
        history: How many changes are kept (the oldest are dropped).

    Raises:
        ConfigurationError: for any invalid option, at construction.

    Thread: the cycle runs on the coordinator's event loop; :meth:`step` may
    also be called from any thread (steps are serialized).
    """

    name = "convergence"

    def __init__(
        self,
        *,
        interval: float = 1.0,
        clock: Clock | None = None,
        min_active: int = 1,
        scale_up_wait: float = 0.05,
        scale_up_busy: float = 0.9,
        scale_down_busy: float = 0.25,
        hysteresis: int = 2,
        history: int = 256,
    ) -> None:
        _check_number("interval", interval, 0.0, None, open_low=True)
        if math.isinf(interval):  # asyncio.sleep(inf): the cycle would silently never run
            raise ConfigurationError(f"interval must be a finite number of seconds, got {interval!r}")
        _check_number("scale_up_wait", scale_up_wait, 0.0, None)
        _check_number("scale_up_busy", scale_up_busy, 0.0, 1.0)
        _check_number("scale_down_busy", scale_down_busy, 0.0, 1.0)
        if scale_down_busy >= scale_up_busy:
            raise ConfigurationError(
                f"scale_down_busy ({scale_down_busy!r}) must be below scale_up_busy ({scale_up_busy!r}) "
                "so there is a band where nothing changes")
        _check_int("min_active", min_active, 1, 1 << 16)
        _check_int("hysteresis", hysteresis, 1, 1 << 16)
        _check_int("history", history, 1, 1 << 20)
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigurationError(f"clock must have monotonic() and time() methods, got {clock!r}")
        self.interval = float(interval)
        self.config = ConvergenceConfig(min_active, float(scale_up_wait), float(scale_up_busy),
                                        float(scale_down_busy), hysteresis)
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._target: ConvergenceTarget | None = None
        self._task: asyncio.Task[None] | None = None
        self._step_lock = threading.Lock()  # serializes step(); never taken by stats()
        self._lock = threading.Lock()  # guards everything below (read by stats() from any thread)
        self._states: dict[int, CoreState] = {}
        self._prev: dict[int, _Prev] = {}
        self._last: dict[int, CoreSignals] = {}
        self._history: Deque[ConvergenceChange] = collections.deque(maxlen=history)
        self._cycles = 0
        self._changes = 0
        self._errors = 0

    # -- lifecycle (loop thread) ---------------------------------------------

    def on_start(self, coordinator: PolicyHost) -> None:
        """Attach and start the background cycle on ``coordinator.loop``."""
        self.attach(coordinator)
        loop = coordinator.loop
        if loop is not None:
            self._task = loop.create_task(self._run(), name=f"{coordinator.name}-convergence")

    def on_stop(self, coordinator: PolicyHost) -> None:
        """Cancel the background cycle and detach."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        self.detach()

    def attach(self, target: ConvergenceTarget) -> None:
        """Bind to *target* without starting a task (tests drive :meth:`step` by hand)."""
        if self.config.min_active > target.workers_per_core:
            logger.warning("convergence: min_active=%d exceeds workers_per_core=%d; using %d",
                           self.config.min_active, target.workers_per_core, target.workers_per_core)
        with self._lock:
            self._target = target
            self._states.clear()
            self._prev.clear()
            self._last.clear()

    def detach(self) -> None:
        """Forget the target; :meth:`step` raises until the next attach."""
        with self._lock:
            self._target = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.step()
            except Exception:
                with self._lock:
                    self._errors += 1
                logger.exception("convergence cycle failed; the next cycle will try again")

    # -- one cycle -----------------------------------------------------------

    def step(self) -> list[ConvergenceChange]:
        """Run one cycle now: measure, decide per core, apply; return the changes made.

        Raises:
            CoordinatorNotRunning: if the policy is not attached to a coordinator.
        """
        with self._step_lock:
            target = self._target
            if target is None:
                raise CoordinatorNotRunning("convergence is not attached to a running coordinator")
            # Outside self._lock: stats() calls every policy's stats(), ours included.
            snapshot = target.stats()
            now = self._clock.monotonic()
            with self._lock:
                signals, self._prev = read_signals(snapshot, self._prev, now)
                decisions = []
                for s in signals:
                    d = decide(s, self._states.get(s.core_id, CoreState()), self.config)
                    self._states[s.core_id] = d.state
                    self._last[s.core_id] = s
                    decisions.append((s, d))
                self._cycles += 1
            changes: list[ConvergenceChange] = []
            for s, d in decisions:
                if d.active == s.active:
                    continue
                target.set_active_workers(s.core_id, d.active)
                change = ConvergenceChange(self._clock.time(), s.core_id, s.active, d.active, d.reason)
                logger.info("convergence: core %d %d -> %d active workers (%s)",
                            s.core_id, s.active, d.active, d.reason)
                changes.append(change)
            if changes:
                with self._lock:
                    self._history.extend(changes)
                    self._changes += len(changes)
            return changes

    # -- inspection ------------------------------------------------------------

    def history(self) -> list[ConvergenceChange]:
        """The recorded changes, oldest first (at most ``history`` of them)."""
        with self._lock:
            return list(self._history)

    def stats(self) -> dict[str, Any]:
        """JSON-ready: configuration, cycles, per-core pattern and streaks, last signals, change history."""
        with self._lock:
            cores = {
                str(cid): {
                    "active": s.active,
                    "max_active": s.max_active,
                    "waiting": s.waiting,
                    "busy_workers": s.busy_workers,
                    "busy_ratio": round(s.busy_ratio, 4),
                    "completed": s.completed,
                    "up_streak": self._states.get(cid, CoreState()).up,
                    "down_streak": self._states.get(cid, CoreState()).down,
                }
                for cid, s in sorted(self._last.items())
            }
            return {
                "running": self._task is not None and not self._task.done(),
                "interval": self.interval,
                "config": asdict(self.config),
                "cycles": self._cycles,
                "errors": self._errors,
                "changes_total": self._changes,
                "history_size": self._history.maxlen,
                "cores": cores,
                "history": [c.to_dict() for c in self._history],
            }


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be an integer between {low} and {high}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float | None, *, open_low: bool = False) -> None:
    ok = False
    if not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value):
        ok = (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if open_low else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        raise ConfigurationError(f"{name} must be a number {bound}, got {value!r}")
