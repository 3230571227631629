"""Shared fixtures: a thread-leak guard for coordinator threads, and coordinator factories."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from tokengate import OperationsCoordinator

#: Thread names tokengate creates: "<name>-core<N>-w<i>" workers and "<name>-loop".
_OUR_THREAD_MARKERS = ("-core", "-loop")


def _our_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if any(m in t.name for m in _OUR_THREAD_MARKERS)}


@pytest.fixture(autouse=True)
def no_leaked_coordinator_threads() -> Iterator[None]:
    """Fail a test that leaves a coordinator's worker or loop thread running."""
    before = _our_threads()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _our_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.01)
        leaked = {t for t in leaked if t.is_alive()}
    assert not leaked, f"threads left running after the test: {sorted(t.name for t in leaked)}"


@pytest.fixture
def run() -> Callable[..., Any]:
    """Run a coroutine to completion on a fresh event loop (tests stay sync and explicit)."""

    def runner(coro: Any) -> Any:
        return asyncio.run(coro)

    return runner


@pytest.fixture
def standalone() -> Iterator[Callable[..., OperationsCoordinator]]:
    """Factory for started standalone coordinators, all stopped at teardown."""
    made: list[OperationsCoordinator] = []

    def make(**options: Any) -> OperationsCoordinator:
        options.setdefault("policies", [])
        options.setdefault("stop_timeout", 5.0)
        coordinator = OperationsCoordinator(**options)
        coordinator.start()
        made.append(coordinator)
        return coordinator

    yield make
    for coordinator in made:
        coordinator.stop()
