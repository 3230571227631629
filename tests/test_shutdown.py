"""Stopping with work in flight: nothing hangs, every token settles once, no thread survives."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tokengate import CoordinatorStopped, GateClosed, OperationsCoordinator, TokenKilled, TokenState, task_token_guard
from virtual_time import VirtualTimeLoop, run_virtual

gate = threading.Event()


@task_token_guard(operation_type="held", tags={"weight": "light"})
def held(i: int) -> int:
    gate.wait(10)
    return i


def test_graceful_stop_lets_queued_work_finish() -> None:
    gate.clear()
    coordinator = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1).start()
    tokens = [held(i) for i in range(5)]
    threading.Timer(0.05, gate.set).start()
    coordinator.stop(timeout=10)
    assert [t.get(timeout=1) for t in tokens] == list(range(5))


def test_stop_timeout_settles_everything_left_with_coordinator_stopped() -> None:
    gate.clear()
    coordinator = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1).start()
    tokens = [held(i) for i in range(4)]
    stopper = threading.Thread(target=coordinator.stop, kwargs={"timeout": 0.05})
    stopper.start()
    # The gate opens only after the stop settled every token: no call can finish first,
    # however late the stop starts (it used to race a 0.3 s timer).
    for token in tokens:
        with pytest.raises(CoordinatorStopped):
            token.get(timeout=10)
        assert token.state is TokenState.KILLED
    gate.set()  # lets the running call end so its thread can exit
    stopper.join(10)
    assert not stopper.is_alive() and not coordinator.running
    assert issubclass(CoordinatorStopped, TokenKilled)


def test_awaiters_never_hang_when_the_coordinator_stops(run: Any) -> None:
    gate.clear()

    async def main() -> None:
        coordinator = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1)
        await coordinator.astart()
        tokens = [held(i) for i in range(3)]
        closing = asyncio.ensure_future(coordinator.aclose(timeout=0.01))
        # The awaiters are released by the stop itself, while the first call still blocks its worker
        results = await asyncio.wait_for(asyncio.gather(*tokens, return_exceptions=True), 5)
        assert all(isinstance(r, CoordinatorStopped) for r in results)
        gate.set()
        await closing
        await coordinator.aclose()  # idempotent

    run(main())


def test_calls_during_and_after_stop_are_refused_clearly(run: Any) -> None:
    gate.clear()

    async def main() -> None:
        coordinator = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1)
        await coordinator.astart()
        first = held(0)
        closing = asyncio.ensure_future(coordinator.aclose(timeout=5))
        await asyncio.sleep(0.01)
        with pytest.raises(GateClosed, match="stopping"):
            held(1)
        gate.set()
        await closing
        assert await first == 0

    run(main())


def test_stop_from_the_loop_thread_in_attached_mode_says_use_aclose(run: Any) -> None:
    from tokengate import WouldDeadlock

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1) as coordinator:
            with pytest.raises(WouldDeadlock, match="aclose"):
                coordinator.stop()

    run(main())


def test_stop_before_start_and_repeated_stop_are_harmless() -> None:
    coordinator = OperationsCoordinator(policies=[])
    coordinator.stop()
    coordinator.stop()
    assert not coordinator.running


def test_many_coordinators_started_and_stopped_leave_no_threads() -> None:
    for _ in range(10):
        with OperationsCoordinator(policies=[], num_cores=2, workers_per_core=2):
            assert held.__wrapped__(1) == 1
    assert not [t for t in threading.enumerate() if "-core" in t.name or "-loop" in t.name]


@pytest.mark.parametrize("bad", ["soon", -1, True, float("nan")])
def test_a_bad_stop_timeout_is_refused_before_the_stop_begins(bad: Any) -> None:
    # A bad value used to fail inside the stop after the phase moved to
    # "stopping": the coordinator was wedged and every later stop() hung.
    from tokengate import ConfigurationError

    coordinator = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1).start()
    try:
        with pytest.raises(ConfigurationError, match="timeout must be"):
            coordinator.stop(timeout=bad)
        assert coordinator.running and held.__wrapped__ is not None
        gate.set()
        assert held(3).get(timeout=5) == 3  # still accepting work
    finally:
        stopper = threading.Thread(target=coordinator.stop, kwargs={"timeout": 5}, daemon=True)
        stopper.start()
        stopper.join(10)
        assert not stopper.is_alive(), "stop() hung"
    assert not coordinator.running


def test_a_bad_drain_timeout_is_refused_before_the_gate_closes(run: Any) -> None:
    from tokengate import ConfigurationError

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1) as coordinator:
            with pytest.raises(ConfigurationError, match="timeout must be"):
                await coordinator.drain(timeout="soon")  # type: ignore[arg-type]
            assert not coordinator.draining
            gate.set()
            assert await held(4) == 4

    run(main())


def test_stop_with_a_function_that_never_returns_takes_about_the_timeout_not_twice(monkeypatch: Any) -> None:
    # Measured on a virtual clock that jumps to the next timer whenever the loop is idle
    # (tests/virtual_time.py), so the stop's waits take no real time and no scheduler
    # delay can move the figure: the coordinator's own deadline reads the same clock.
    from tokengate import coordinator as coordinator_module

    loop_box: list[VirtualTimeLoop] = []
    monkeypatch.setattr(coordinator_module, "_perf", lambda: loop_box[0].time())
    stuck, entered = threading.Event(), threading.Event()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, VirtualTimeLoop)
        loop_box.append(loop)
        coordinator = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1)
        await coordinator.astart()
        # Given a call stuck in its function (it returns only when the test lets it)
        token = held_until(stuck, entered)
        assert await loop.run_in_executor(None, entered.wait, 10)
        # When the coordinator stops with a 2 s grace
        started = loop.time()
        await coordinator.aclose(timeout=2.0)
        took = loop.time() - started
        assert token.state is TokenState.KILLED
        return took

    try:
        took = run_virtual(main(), autojump=True)
    finally:
        stuck.set()
    # Then the stop spends the grace once, plus the documented 0.5 s for threads to leave (was 2 x grace)
    assert 2.0 + 0.5 <= took <= 2.0 + 0.5 + 0.01, took


@task_token_guard(operation_type="held_until", tags={"weight": "light"})
def held_until(event: threading.Event, entered: threading.Event | None = None) -> None:
    if entered is not None:
        entered.set()
    event.wait(30)
