"""Bounded measurement helpers: latency reservoirs, a rate meter, the execution history."""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Any, Deque, Iterable

__all__ = ["Reservoir", "RateMeter", "ExecutionRecord", "percentiles"]


def percentiles(values: Iterable[float], points: Iterable[float] = (50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles of *values* (None when empty), keyed ``p50`` etc."""
    data = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        key = f"p{p:g}"
        if not data:
            out[key] = None
        else:
            rank = max(1, math.ceil(p / 100 * len(data)))
            out[key] = data[rank - 1]
    return out


class Reservoir:
    """The most recent *size* samples (a sliding window, not all-time), with summary stats.

    Appends are O(1); ``summary()`` sorts a copy. Thread: append from one thread
    (the loop); read from any.
    """

    __slots__ = ("samples", "count")

    def __init__(self, size: int) -> None:
        self.samples: Deque[float] = collections.deque(maxlen=size)
        self.count = 0

    def add(self, value: float) -> None:
        self.samples.append(value)
        self.count += 1

    def summary(self, count: int | None = None) -> dict[str, Any]:
        """Window statistics; *count* overrides the all-time count (for callers that append directly)."""
        samples = list(self.samples)
        pct = percentiles(samples, (50, 90, 95, 99))
        return {
            "count": self.count if count is None else count,
            "window": len(samples),
            "mean": (sum(samples) / len(samples)) if samples else None,
            "max": max(samples) if samples else None,
            **pct,
        }


class RateMeter:
    """Events per second over a recent window, from one-second buckets (bounded)."""

    __slots__ = ("_buckets", "_window", "_clock")

    def __init__(self, window: int = 10, clock: Any = time.monotonic) -> None:
        self._window = window
        self._buckets: Deque[list[float]] = collections.deque(maxlen=window + 1)
        self._clock = clock

    def add(self, n: int = 1) -> None:
        second = int(self._clock())
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += n
        else:
            buckets.append([second, n])

    def rate(self) -> float:
        now = int(self._clock())
        start = now - self._window
        total = sum(count for second, count in self._buckets if start < second <= now)
        return total / self._window


@dataclass(frozen=True)
class ExecutionRecord:
    """One settled call, as kept in the bounded execution history."""

    token_id: str
    operation_type: str
    state: str
    success: bool
    weight: str
    queue_wait: float | None
    run_time: float | None
    core_id: int | None
    worker_id: str | None
    attempt: int
    finished_at: float
    error: str | None
    complexity: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "operation_type": self.operation_type,
            "state": self.state,
            "success": self.success,
            "weight": self.weight,
            "queue_wait": self.queue_wait,
            "run_time": self.run_time,
            "core_id": self.core_id,
            "worker_id": self.worker_id,
            "attempt": self.attempt,
            "finished_at": self.finished_at,
            "error": self.error,
            "complexity": self.complexity,
        }
