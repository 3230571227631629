"""The ``lanes`` benchmark's functions, in an importable module (worker processes find them by name).

Each workload is a plain module-level function (what the anchors run:
``ProcessPoolExecutor``, ``anyio.to_process`` and a thread pool pickle or call
it directly) plus decorated twins that differ only in their lane:

* ``*_p``: ``tags={"lane": "process"}``: the call runs in a worker process;
* ``*_t``: the default thread lane.

The CPU workloads are tagged ``heavy`` on both lanes, so both get the same
routing (heavy owns domain 1 and may spill onto the others); the trivial
function's weight is left to inference (``light``), as a user would get it.

CPU workloads (each sized by the benchmark to about 20 ms of one core; every
contender's call returns ``(value, CPU seconds the call used on its thread)``,
so the benchmark can add up the CPU really spent in the calls):

* :func:`spin`: a bare pure-Python arithmetic loop;
* :func:`cpu_crunch`, :func:`data_sort`, :func:`hash_chain`: the seeds'
  maximum-concurrency functions (bodies as in ``benchmarks/_workloads.py``,
  without the per-thread meter), with larger arguments.

:func:`crash_or_inc` ends its own process (``os._exit``) when asked to: the
crash storm's 10 %.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Any, Callable

from tokengate import GuardedFunction, task_token_guard

__all__ = [
    "inc", "spin", "cpu_crunch", "data_sort", "hash_chain", "crash_or_inc", "measured",
    "inc_p", "inc_t", "crash_or_inc_p", "CPU_WORKLOADS",
]

_PROCESS = {"lane": "process"}
_HEAVY_PROCESS = {"lane": "process", "weight": "heavy"}
_HEAVY_THREAD = {"weight": "heavy"}


# -- plain bodies (what the anchors run) ------------------------------------------------


def inc(x: int) -> int:
    """The trivial call: all its cost is the hand-off."""
    return x + 1


def spin(n: int) -> int:
    """A bare pure-Python loop of *n* steps (no allocation, no C call that releases the GIL)."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def cpu_crunch(n: int) -> int:
    """The seeds' ``cpu_crunch``: sum the primes below *n* by trial division."""
    total = 0
    for i in range(2, n):
        if all(i % j != 0 for j in range(2, int(i**0.5) + 1)):
            total += i
    return total


def data_sort(size: int) -> int:
    """The seeds' ``data_sort``: sort *size* random ints (returns a checksum, not the list, to keep IPC small)."""
    rng = random.Random(size)
    data = [rng.randint(0, 100_000) for _ in range(size)]
    ordered = sorted(data)
    return ordered[0] + ordered[-1] + len(ordered)


def hash_chain(iterations: int) -> str:
    """The seeds' ``hash_chain``: *iterations* chained SHA-256 digests of 32 bytes (too small to release the GIL)."""
    h = b"lanes_seed"
    for _ in range(iterations):
        h = hashlib.sha256(h).digest()
    return h.hex()


def measured(fn: Callable[[int], Any], arg: int) -> tuple[Any, float]:
    """``(fn(arg), CPU seconds of this thread spent in it)``: in a worker process that is the call's own CPU time.

    ``time.thread_time`` counts only the calling thread, so a thread-lane call
    waiting for the GIL is not billed: the sum over calls ÷ wall time is the
    real parallelism of a contender, comparable across lanes.
    """
    c0 = time.thread_time()
    value = fn(arg)
    return value, time.thread_time() - c0


def spin_m(n: int) -> tuple[int, float]:
    return measured(spin, n)


def cpu_crunch_m(n: int) -> tuple[int, float]:
    return measured(cpu_crunch, n)


def data_sort_m(size: int) -> tuple[int, float]:
    return measured(data_sort, size)


def hash_chain_m(iterations: int) -> tuple[str, float]:
    return measured(hash_chain, iterations)


def crash_or_inc(x: int, crash: bool) -> int:
    """``x + 1``, or end this process at once (``os._exit``, no cleanup) when *crash* is true."""
    if crash:
        os._exit(17)
    return x + 1


# -- decorated twins -------------------------------------------------------------------------
# Module-level wrappers with their own names: a process-lane function travels by
# its import path, and each decorated function is one operation type.


@task_token_guard(operation_type="lanes.inc_p", tags=_PROCESS)
def inc_p(x: int) -> int:
    return x + 1


@task_token_guard(operation_type="lanes.inc_t")
def inc_t(x: int) -> int:
    return x + 1


@task_token_guard(operation_type="lanes.spin_p", tags=_HEAVY_PROCESS)
def spin_p(n: int) -> tuple[int, float]:
    return measured(spin, n)


@task_token_guard(operation_type="lanes.spin_t", tags=_HEAVY_THREAD)
def spin_t(n: int) -> tuple[int, float]:
    return measured(spin, n)


@task_token_guard(operation_type="lanes.cpu_crunch_p", tags=_HEAVY_PROCESS)
def cpu_crunch_p(n: int) -> tuple[int, float]:
    return measured(cpu_crunch, n)


@task_token_guard(operation_type="lanes.cpu_crunch_t", tags=_HEAVY_THREAD)
def cpu_crunch_t(n: int) -> tuple[int, float]:
    return measured(cpu_crunch, n)


@task_token_guard(operation_type="lanes.data_sort_p", tags=_HEAVY_PROCESS)
def data_sort_p(size: int) -> tuple[int, float]:
    return measured(data_sort, size)


@task_token_guard(operation_type="lanes.data_sort_t", tags=_HEAVY_THREAD)
def data_sort_t(size: int) -> tuple[int, float]:
    return measured(data_sort, size)


@task_token_guard(operation_type="lanes.hash_chain_p", tags=_HEAVY_PROCESS)
def hash_chain_p(iterations: int) -> tuple[str, float]:
    return measured(hash_chain, iterations)


@task_token_guard(operation_type="lanes.hash_chain_t", tags=_HEAVY_THREAD)
def hash_chain_t(iterations: int) -> tuple[str, float]:
    return measured(hash_chain, iterations)


@task_token_guard(operation_type="lanes.crash_or_inc_p", tags=_PROCESS)
def crash_or_inc_p(x: int, crash: bool) -> int:
    return crash_or_inc(x, crash)


#: name → (plain body, its measured form (what the pool runs), process-lane twin, thread-lane twin,
#: a first guess at the argument for ~20 ms)
CPU_WORKLOADS: dict[str, tuple[Callable[[int], Any], Callable[[int], tuple[Any, float]],
                               GuardedFunction[[int], tuple[Any, float]], GuardedFunction[[int], tuple[Any, float]],
                               int]] = {
    "spin": (spin, spin_m, spin_p, spin_t, 150_000),
    "cpu_crunch": (cpu_crunch, cpu_crunch_m, cpu_crunch_p, cpu_crunch_t, 20_000),
    "data_sort": (data_sort, data_sort_m, data_sort_p, data_sort_t, 20_000),
    "hash_chain": (hash_chain, hash_chain_m, hash_chain_p, hash_chain_t, 40_000),
}


@task_token_guard(operation_type="lanes.probe_t", tags={"weight": "light"})
def probe_t() -> int:
    """The HTTP part's light endpoint: a trivial call on the thread lane."""
    return sum(range(100))
