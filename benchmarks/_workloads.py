"""The functions the benchmarks run, and a per-thread CPU/wall meter for the waves.

* ``noop``: the trivial token (``def noop(): return None``), weight inferred (light).
* The seeds' maximum-concurrency workload (``../shared/notes/prior-art.md`` §8.1),
  with bodies exactly as published: ``cpu_crunch`` (light), ``string_transform``
  (light), ``data_sort`` (medium), ``hash_chain`` (heavy), assigned round-robin
  by the index *i* within a wave (see :func:`wave_job`).

The wave functions are wrapped by :func:`metered`, which adds each call's thread
CPU time (``time.thread_time``) and wall time to a per-thread cell. Every
contender runs the same wrapped function, so the wrapper costs all of them alike.
"""

from __future__ import annotations

import functools
import hashlib
import random
import string
import threading
import time
from typing import Any, Callable, TypeVar

from tokengate import GuardedFunction, task_token_guard

__all__ = ["noop", "metered", "meter_totals", "WAVE_FUNCS", "wave_job", "wave_sizes"]

F = TypeVar("F", bound=Callable[..., Any])

_thread_time = time.thread_time
_perf = time.perf_counter


@task_token_guard(operation_type="bench.noop")
def noop() -> None:
    """The trivial token: all cost is dispatch."""
    return None


# -- per-thread meter -------------------------------------------------------------

_cells: list[list[float]] = []
_cells_lock = threading.Lock()  # guards _cells (append once per thread)


class _Meter(threading.local):
    def __init__(self) -> None:
        # Runs once per thread on first use: each thread owns one cell, so
        # updates need no lock; readers sum the cells after a wave settled.
        self.cell = [0.0, 0.0, 0.0]  # thread CPU s, wall s, calls
        with _cells_lock:
            _cells.append(self.cell)


_meter = _Meter()


def metered(fn: F) -> F:
    """Wrap *fn* so each call adds its thread CPU time and wall time to this thread's cell."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        cell = _meter.cell
        c0 = _thread_time()
        w0 = _perf()
        try:
            return fn(*args)
        finally:
            cell[0] += _thread_time() - c0
            cell[1] += _perf() - w0
            cell[2] += 1

    return wrapper  # type: ignore[return-value]


def meter_totals() -> tuple[float, float, int]:
    """(Σ thread CPU seconds, Σ wall seconds, calls) over every thread so far."""
    with _cells_lock:
        cells = list(_cells)
    return sum(c[0] for c in cells), sum(c[1] for c in cells), int(sum(c[2] for c in cells))


# -- the seeds' workload ------------------------------------------------------------


@task_token_guard(operation_type="cpu_crunch", tags={"weight": "light"})
@metered
def cpu_crunch(n: int) -> int:
    """Sum primes up to n — lightweight CPU-bound work."""
    total = 0
    for i in range(2, n):
        if all(i % j != 0 for j in range(2, int(i**0.5) + 1)):
            total += i
    return total


@task_token_guard(operation_type="string_ops", tags={"weight": "light"})
@metered
def string_transform(seed: int) -> str:
    """Generate and mangle a string — lightweight string work."""
    rng = random.Random(seed)
    chars = [rng.choice(string.ascii_letters) for _ in range(300)]
    text = "".join(chars)
    return text[::-1].upper().replace("A", "4").replace("E", "3").replace("I", "1")


@task_token_guard(operation_type="data_transform", tags={"weight": "medium"})
@metered
def data_sort(size: int) -> list[int]:
    """Sort a random list — medium CPU work."""
    rng = random.Random(size)
    data = [rng.randint(0, 100_000) for _ in range(size)]
    return sorted(data)


@task_token_guard(operation_type="hash_compute", tags={"weight": "heavy"})
@metered
def hash_chain(seed: str, iterations: int) -> str:
    """Iterative SHA-256 chain — heavier CPU-bound work."""
    h = seed.encode()
    for _ in range(iterations):
        h = hashlib.sha256(h).digest()
    return h.hex()


WAVE_FUNCS: tuple[GuardedFunction[..., Any], ...] = (cpu_crunch, string_transform, data_sort, hash_chain)


def wave_job(i: int) -> tuple[GuardedFunction[..., Any], tuple[Any, ...]]:
    """The seeds' call number *i* of a wave: function by i mod 4, arguments from i."""
    kind = i % 4
    if kind == 0:
        return cpu_crunch, (60 + i % 25,)
    if kind == 1:
        return string_transform, (31 * i,)
    if kind == 2:
        return data_sort, (400 + i % 300,)
    return hash_chain, (f"wave_seed_{i}", 120 + i % 80)


def wave_sizes(max_tokens: int) -> list[int]:
    """Doubling waves 4, 8, ..., up to *max_tokens* (15 waves and 131,068 tokens for 65,536)."""
    sizes = []
    n = 4
    while n <= max_tokens:
        sizes.append(n)
        n *= 2
    return sizes
