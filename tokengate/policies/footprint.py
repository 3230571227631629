"""Argument footprints: a cheap size estimate of a call's arguments, and spike limits.

Used by the quarantine's argument-spike trigger: the estimate is O(number of
top-level arguments) and never raises, so it can run on every call.
"""

from __future__ import annotations

import collections
import itertools
import math
import sys
import time
from typing import Any, Callable, Deque, Mapping

__all__ = ["footprint", "Footprints"]

_RECOMPUTE_EVERY = 32  # accepted samples between p99 refreshes (sorting the window is the cost)
_SAMPLE = 4  # items sampled from a container argument
_MAX_TOP = 64  # top-level arguments measured (the rest extrapolated)

_getsizeof = sys.getsizeof
_FLAT = frozenset({str, bytes, bytearray, int, float, bool, complex, type(None)})
_CONTAINERS = (list, tuple, dict, set, frozenset, collections.deque)


def _size(value: object) -> int:
    """Estimated bytes of one argument: its own size plus a sampled size of its items."""
    tp = type(value)
    if tp in _FLAT:
        return _getsizeof(value)
    try:
        size = _getsizeof(value)
        if isinstance(value, _CONTAINERS):
            n = len(value)
            if n:
                if isinstance(value, dict):
                    items = [_getsizeof(k) + _getsizeof(v) for k, v in itertools.islice(value.items(), _SAMPLE)]
                else:
                    items = [_getsizeof(v) for v in itertools.islice(value, _SAMPLE)]
                size += sum(items) * n // len(items)
        elif isinstance(value, memoryview):
            size += value.nbytes
        elif getattr(tp, "nbytes", None) is not None:  # numpy/torch views; looked up on the type only
            nbytes = getattr(value, "nbytes")
            if isinstance(nbytes, int) and nbytes > size:
                size = nbytes
        return size
    except Exception:  # a broken __sizeof__ / __len__ / __iter__ costs only accuracy
        return 64


def footprint(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """A cheap estimate of a call's argument size in bytes; never raises.

    ``sys.getsizeof`` of each top-level argument plus, for list, tuple, dict,
    set and deque, its length times the mean size of its first few items; for
    objects with an ``nbytes`` (numpy, torch, memoryview) their buffer size. The
    work is O(number of top-level arguments), capped at 64 of them (the rest
    are extrapolated): nested structures are never walked, so objects whose
    bulk hides deeper down are underestimated.
    """
    total = 0
    if len(args) <= _MAX_TOP:
        for value in args:
            # Hot path: plain scalars skip the general estimate.
            total += _getsizeof(value) if type(value) in _FLAT else _size(value)
    else:
        total += sum(_size(v) for v in itertools.islice(args, _MAX_TOP)) * len(args) // _MAX_TOP
    if kwargs:
        if len(kwargs) <= _MAX_TOP:
            for value in kwargs.values():
                total += _getsizeof(value) if type(value) in _FLAT else _size(value)
        else:
            part = sum(_size(v) for v in itertools.islice(kwargs.values(), _MAX_TOP))
            total += part * len(kwargs) // _MAX_TOP
    return total


class Footprints:
    """Recent accepted footprints of one operation and the spike limit derived from them.

    ``limit`` is the footprint above which a call is a spike: infinite until
    ``min_samples`` were seen, then ``max(factor x baseline, min_bytes)``,
    refreshed every ``_RECOMPUTE_EVERY`` samples (sorting the window is the
    cost, so the hot path is one comparison and an append).

    ``baseline`` is the window's p99, except that it never falls faster than
    by half every ``half_life`` seconds: ``max(p99, previous baseline x
    2^(-elapsed / half_life))``. Without that, anyone able to make many tiny
    calls of an operation (a few hundred suffice to fill a window of 256)
    could drag its p99 down within seconds so that the next ordinary call --
    larger than ``min_bytes`` -- is quarantined: a denial of service against
    other callers. With it, the limit over ordinary calls of size B lasts
    ``log2(factor) x half_life`` seconds of a flood that makes up over 99 % of
    the operation's calls (30 minutes with the defaults), whatever the flood's
    rate, and never drops below ``min_bytes``; ordinary calls that remain at
    least 1 % of the window keep the p99, hence the limit, where it was. The
    decay is measured on *clock* (monotonic seconds). Caller holds its
    policy's lock.
    """

    __slots__ = ("samples", "countdown", "limit", "p99", "baseline", "stamp", "half_life", "clock")

    def __init__(self, window: int, min_samples: int, half_life: float = math.inf,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.samples: Deque[int] = collections.deque(maxlen=window)
        self.countdown = min_samples
        self.limit = math.inf
        self.p99 = 0
        self.baseline = 0.0
        self.stamp = 0.0
        self.half_life = half_life
        self.clock = clock

    def add(self, size: int, factor: float, min_bytes: int) -> None:
        """Record an accepted call's footprint; refresh the limit every few samples."""
        self.samples.append(size)
        self.countdown -= 1
        if self.countdown <= 0:
            n = len(self.samples)
            self.p99 = p99 = sorted(self.samples)[math.ceil(0.99 * n) - 1]
            now = self.clock()
            remembered = self.baseline
            if remembered > p99 and self.half_life != math.inf:
                remembered *= 0.5 ** (max(0.0, now - self.stamp) / self.half_life)
            self.baseline = max(float(p99), remembered)
            self.stamp = now
            self.limit = max(factor * self.baseline, min_bytes)
            self.countdown = _RECOMPUTE_EVERY
