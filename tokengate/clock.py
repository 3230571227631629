"""Injected time: a :class:`Clock` protocol, the real clock and a manual one for tests.

Policies that measure intervals or stamp records take a ``clock`` argument
instead of calling :mod:`time` directly, so tests can move time by hand
(trio's ``MockClock`` idea) rather than sleep.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

from .errors import ConfigurationError

__all__ = ["Clock", "MonotonicClock", "ManualClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time: ``monotonic()`` for intervals, ``time()`` for wall-clock stamps."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (only differences mean anything)."""
        ...

    def time(self) -> float:
        """Seconds since the Unix epoch, for records shown to people."""
        ...


class MonotonicClock:
    """The real clock: :func:`time.monotonic` and :func:`time.time`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "MonotonicClock()"


class ManualClock:
    """A clock that only moves when told to, for deterministic tests.

    Both readings start where given and move together on :meth:`advance`.
    Thread: any (a lock makes ``advance`` atomic with respect to readers).
    """

    def __init__(self, start: float = 0.0, wall_start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()  # guards _now and _wall
        self._now = float(start)
        self._wall = float(wall_start)

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def time(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        """Move both readings forward by *seconds* (must be >= 0)."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ConfigurationError(f"a clock only moves forward; advance() got {seconds!r}")
        with self._lock:
            self._now += seconds
            self._wall += seconds

    def __repr__(self) -> str:
        return f"ManualClock(monotonic={self._now:g})"
