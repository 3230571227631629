"""A worker process's replacement and the cyclic garbage collector.

Each worker process gets a fresh lock (a named semaphore that multiprocessing's
resource tracker knows about). Making one and starting a process call into the
tracker; a collection that runs inside those calls and frees an earlier
process's lock would call the tracker again from its finalizer, which CPython
does not support (gh-109629: Python warns that the semaphore "might leak"; the
suite turns warnings into errors). The lane must never start a collection
there. The test makes one certain wherever the collector is allowed to run: an
earlier lock kept only by a reference cycle, and collections only
when the tracker's critical section allocates.
"""

from __future__ import annotations

import gc
from typing import Any, Iterator

import pytest
from multiprocessing import resource_tracker

from tokengate.lanes import ChildProcess, reference_to

from . import child_functions as cf


def _python_frame() -> None:
    """Entering a Python frame is where the interpreter runs a scheduled collection."""


@pytest.fixture
def collect_on_every_allocation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    tracker = resource_tracker._resource_tracker
    check_alive = tracker._check_alive

    def allocating_check_alive() -> bool:
        # Runs under the tracker's lock: allocations here start a collection if one may start.
        gc.set_threshold(1, 1, 1)
        try:
            garbage = [[] for _ in range(64)]
            del garbage
            for _ in range(8):  # the allocation only schedules a collection: let the interpreter run it
                _python_frame()
        finally:
            gc.set_threshold(*quiet)
        return bool(check_alive())

    monkeypatch.setattr(tracker, "_check_alive", allocating_check_alive)
    thresholds = gc.get_threshold()
    quiet = (10**9, 10**9, 10**9)  # elsewhere, no collection: the cycles below wait for the tracker's
    gc.collect()
    gc.set_threshold(*quiet)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


def test_replacing_a_process_never_collects_inside_the_resource_tracker(collect_on_every_allocation: None) -> None:
    handle = ChildProcess(name="lanes-test-gc", max_calls=1)
    try:
        for _ in range(4):
            before: Any = handle._shared
            assert handle.call(reference_to(cf.pid)).unwrap() > 0
            if before is not None:
                assert handle._shared is not before  # replaced: max_calls=1
                # The retired process's lock now lives on only through a new cycle: the
                # next collection frees it, and the next collection is in the tracker.
                cycle: list[Any] = [before]
                cycle.append(cycle)
                del cycle
            del before
        # Each call after the first replaced the process (max_calls=1), under a collection per allocation.
        assert handle.stats().recycles == 3
    finally:
        handle.close()
    gc.collect()
