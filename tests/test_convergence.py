"""Tests for tokengate.convergence: the pure decision, signal reading, the cycle, and a live coordinator."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from tokengate import ConfigurationError, CoordinatorNotRunning, OperationsCoordinator, task_token_guard
from tokengate.clock import Clock, ManualClock, MonotonicClock
from tokengate.convergence import (
    ConvergenceConfig,
    ConvergencePolicy,
    CoreSignals,
    CoreState,
    decide,
    read_signals,
)

CONFIG = ConvergenceConfig(min_active=1, scale_up_wait=0.05, scale_up_busy=0.9, scale_down_busy=0.25, hysteresis=2)


def signals(active: int = 2, waiting: int = 0, busy: float = 0.5, p90: float | None = None,
            max_active: int = 4) -> CoreSignals:
    return CoreSignals(core_id=1, active=active, max_active=max_active, waiting=waiting,
                       busy_workers=0, busy_ratio=busy, completed=0, queue_wait_p90=p90)


def run(seq: list[CoreSignals], config: ConvergenceConfig = CONFIG) -> list[int]:
    """Feed a sequence of signals, applying each decision; return the active count after each."""
    state, out, active = CoreState(), [], seq[0].active
    for s in seq:
        s = CoreSignals(s.core_id, active, s.max_active, s.waiting, s.busy_workers, s.busy_ratio, s.completed,
                        s.queue_wait_p90)
        active, _, state = decide(s, state, config)
        out.append(active)
    return out


# -- decide (pure) ---------------------------------------------------------------------------


def test_backlog_scales_up_by_one_after_hysteresis_cycles() -> None:
    # Given more waiting tokens than active workers
    first = decide(signals(active=2, waiting=5, busy=1.0), CoreState(), CONFIG)
    # Then the first cycle only counts, the second scales up by one
    assert first.active == 2 and first.reason == "" and first.state == CoreState(up=1)
    second = decide(signals(active=2, waiting=5, busy=1.0), first.state, CONFIG)
    assert second.active == 3 and second.state == CoreState()
    assert second.reason.startswith("backlog for 2 cycles: 5 waiting for 2 active workers")


@pytest.mark.parametrize(
    ("waiting", "busy", "p90", "backlog"),
    [
        (1, 0.95, None, True),  # all busy with work waiting
        (1, 0.5, 0.2, True),  # queue wait above scale_up_wait
        (1, 0.5, 0.01, False),  # a little waiting work moving fast
        (3, 0.1, None, True),  # more waiting than active workers
        (0, 1.0, 9.0, False),  # busy but nothing waiting: more workers would not help
    ],
)
def test_what_counts_as_a_backlog(waiting: int, busy: float, p90: float | None, backlog: bool) -> None:
    state = CoreState()
    for _ in range(2):
        d = decide(signals(active=2, waiting=waiting, busy=busy, p90=p90), state, CONFIG)
        state = d.state
    assert (d.active == 3) is backlog


def test_idle_scales_down_to_min_active_and_no_further() -> None:
    seq = [signals(active=4, waiting=0, busy=0.0)] * 10
    assert run(seq) == [4, 3, 3, 2, 2, 1, 1, 1, 1, 1]
    capped = ConvergenceConfig(min_active=3, hysteresis=2)
    assert run(seq, capped)[-1] == 3


def test_never_above_max_active_and_streaks_are_capped() -> None:
    seq = [signals(active=3, waiting=9, busy=1.0, max_active=4)] * 8
    assert run(seq) == [3, 4, 4, 4, 4, 4, 4, 4]
    d = decide(signals(active=4, waiting=9, busy=1.0), CoreState(up=2), CONFIG)
    assert d.active == 4 and d.state.up == 2


def test_alternating_signals_never_flap() -> None:
    # Given backlog and idleness alternating every cycle
    busy = signals(active=2, waiting=5, busy=1.0)
    idle = signals(active=2, waiting=0, busy=0.0)
    # Then the pattern never moves
    assert set(run([busy, idle] * 20)) == {2}


def test_a_neutral_cycle_resets_the_streak() -> None:
    busy = signals(active=2, waiting=5, busy=1.0)
    neutral = signals(active=2, waiting=0, busy=0.5)  # between scale_down_busy and scale_up_busy
    assert run([busy, neutral, busy, neutral, busy]) == [2, 2, 2, 2, 2]
    assert run([busy, neutral, busy, busy]) == [2, 2, 2, 3]


def test_min_active_above_workers_per_core_is_capped() -> None:
    d = decide(signals(active=2, waiting=0, busy=0.0, max_active=2), CoreState(down=5),
               ConvergenceConfig(min_active=8))
    assert d.active == 2


# -- read_signals (pure) ----------------------------------------------------------------------------


def fake_stats(*, active: int = 2, depth: int = 0, busy_workers: int = 0, busy_time: float = 0.0,
               executed: int = 0, pending: dict[str, int] | None = None, paused: bool = False,
               pinned: int = 0, p90: float | None = None) -> dict[str, Any]:
    workers = [{"busy_time": busy_time, "executed": executed}] + [{"busy_time": 0.0, "executed": 0}] * 3
    return {
        "paused": paused,
        "pending": pending or {"heavy": 0, "medium": 0, "light": 0},
        "routing": {"allowed": {"heavy": [1, 2], "medium": [2], "light": [2]}},
        "queue_wait": {"p90": p90},
        "cores": [
            {"core_id": 1, "active_workers": active, "queue_depth": depth, "pinned_pending": pinned,
             "busy_workers": busy_workers, "workers": workers},
            {"core_id": 2, "active_workers": 4, "queue_depth": 0, "pinned_pending": 0,
             "busy_workers": 0, "workers": [{"busy_time": 0.0, "executed": 0}] * 4},
        ],
    }


def test_busy_ratio_is_busy_time_over_elapsed_times_active() -> None:
    # Given 1.5 s of busy time added over 1 s on 2 active workers
    _, prev = read_signals(fake_stats(busy_time=10.0, executed=5), {}, now=100.0)
    sig, _ = read_signals(fake_stats(busy_time=11.5, executed=9), prev, now=101.0)
    assert sig[0].busy_ratio == pytest.approx(0.75)
    assert sig[0].completed == 4 and sig[0].max_active == 4


def test_busy_ratio_uses_the_instantaneous_share_when_higher() -> None:
    # Given a long blocking call that has not finished (no busy time credited yet)
    sig, _ = read_signals(fake_stats(busy_workers=2), {}, now=1.0)
    assert sig[0].busy_ratio == 1.0


def test_waiting_counts_mailboxes_pins_and_pending_of_served_classes() -> None:
    stats = fake_stats(depth=3, pinned=1, pending={"heavy": 5, "medium": 7, "light": 0}, p90=0.2)
    sig, _ = read_signals(stats, {}, now=1.0)
    assert sig[0].waiting == 3 + 1 + 5  # core 1 serves heavy only
    assert sig[1].waiting == 5 + 7
    assert sig[0].queue_wait_p90 == 0.2
    paused, _ = read_signals(fake_stats(depth=3, pending={"heavy": 5}, paused=True), {}, now=1.0)
    assert paused[0].waiting == 0


# -- the cycle, on a fake coordinator ---------------------------------------------------------------------


class FakeCoordinator:
    """A ConvergenceTarget whose load the test sets directly."""

    def __init__(self, active: int = 4, workers_per_core: int = 4) -> None:
        self.workers_per_core = workers_per_core
        self.active = active
        self.depth = 0
        self.busy = 0
        self.busy_time = 0.0
        self.calls: list[tuple[int, int]] = []

    def stats(self) -> dict[str, Any]:
        workers = [{"busy_time": self.busy_time, "executed": 0}] + [{"busy_time": 0.0, "executed": 0}] * (
            self.workers_per_core - 1)
        return {"paused": False, "pending": {}, "routing": {"allowed": {}}, "queue_wait": {"p90": None},
                "cores": [{"core_id": 1, "active_workers": self.active, "queue_depth": self.depth,
                           "pinned_pending": 0, "busy_workers": self.busy, "workers": workers}]}

    def set_active_workers(self, core_id: int, active: int) -> None:
        self.calls.append((core_id, active))
        self.active = active


def cycle(policy: ConvergencePolicy, clock: ManualClock, n: int) -> None:
    for _ in range(n):
        clock.advance(1.0)
        policy.step()


def test_the_cycle_scales_up_under_backlog_and_records_history() -> None:
    # Given a core trimmed to 1 worker with every worker blocked and 10 calls waiting
    clock = ManualClock(wall_start=5000.0)
    fake = FakeCoordinator(active=1)
    fake.depth, fake.busy = 10, 1
    policy = ConvergencePolicy(clock=clock)
    policy.attach(fake)
    # When 8 cycles run
    cycle(policy, clock, 8)
    # Then it grew one step per 2 cycles up to workers_per_core, and each change was recorded
    assert fake.calls == [(1, 2), (1, 3), (1, 4)]
    history = policy.history()
    assert [(c.core, c.from_active, c.to_active) for c in history] == [(1, 1, 2), (1, 2, 3), (1, 3, 4)]
    assert history[0].time == 5002.0 and "backlog" in history[0].reason
    stats = json.loads(json.dumps(policy.stats()))
    assert stats["cycles"] == 8 and stats["changes_total"] == 3 and len(stats["history"]) == 3
    assert stats["cores"]["1"]["active"] == 4


def test_the_cycle_scales_down_when_idle() -> None:
    clock = ManualClock()
    fake = FakeCoordinator(active=4)
    policy = ConvergencePolicy(clock=clock, min_active=2)
    policy.attach(fake)
    cycle(policy, clock, 10)
    assert fake.calls == [(1, 3), (1, 2)]
    assert all("idle" in c.reason for c in policy.history())


def test_hysteresis_prevents_flapping_in_the_cycle() -> None:
    clock = ManualClock()
    fake = FakeCoordinator(active=2)
    policy = ConvergencePolicy(clock=clock, hysteresis=2)
    policy.attach(fake)
    for i in range(20):
        fake.depth, fake.busy = (10, 2) if i % 2 == 0 else (0, 0)
        cycle(policy, clock, 1)
    assert fake.calls == []


def test_history_is_bounded() -> None:
    clock = ManualClock()
    fake = FakeCoordinator(active=4)
    policy = ConvergencePolicy(clock=clock, hysteresis=1, history=2)
    policy.attach(fake)
    cycle(policy, clock, 3)  # 4 -> 3 -> 2 -> 1
    assert [c.to_active for c in policy.history()] == [2, 1]
    assert policy.stats()["changes_total"] == 3 and policy.stats()["history_size"] == 2


def test_step_needs_a_target() -> None:
    with pytest.raises(CoordinatorNotRunning):
        ConvergencePolicy().step()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0},
        {"interval": "1"},
        {"interval": float("inf")},  # the cycle would never run
        {"min_active": 0},
        {"hysteresis": 0},
        {"history": 0},
        {"scale_down_busy": 0.95},
        {"scale_up_busy": 1.5},
        {"scale_up_wait": -1},
        {"clock": object()},
    ],
)
def test_bad_configuration_is_refused_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ConvergencePolicy(**kwargs)


def test_clocks() -> None:
    clock = ManualClock(start=1.0, wall_start=10.0)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (3.5, 12.5)
    with pytest.raises(ConfigurationError):
        clock.advance(-1)
    assert isinstance(MonotonicClock(), Clock) and isinstance(clock, Clock)


# -- a live coordinator ---------------------------------------------------------------------------------------

_STARTED = threading.Semaphore(0)
_GATE = threading.Event()


@task_token_guard(operation_type="conv.block")
def block(i: int) -> int:
    _STARTED.release()
    _GATE.wait(30)
    return i


@task_token_guard(operation_type="conv.square")
def square(i: int) -> int:
    return i * i


class SignallingConvergence(ConvergencePolicy):
    """Sets an event after every cycle, so a test can wait for the background task."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cycled = threading.Event()

    def step(self) -> list[Any]:
        changes = super().step()
        self.cycled.set()
        return changes


def test_live_coordinator_trims_idle_then_grows_under_a_blocking_backlog() -> None:
    clock = ManualClock()
    policy = ConvergencePolicy(interval=3600, clock=clock)  # the test drives the cycles
    _GATE.clear()
    coordinator = OperationsCoordinator(num_cores=1, workers_per_core=4, policies=[policy], name="conv")
    coordinator.start()
    try:
        # Given an idle core, trimmed to one active worker
        cycle(policy, clock, 6)
        assert coordinator.active_workers(1) == 1

        # When that worker blocks and more calls queue behind it
        tokens = [block(i) for i in range(4)]
        assert _STARTED.acquire(timeout=10)
        cycle(policy, clock, 2)

        # Then the core grew, and a new call starts at once on the new worker
        assert coordinator.active_workers(1) == 2
        tokens.append(block(99))
        assert _STARTED.acquire(timeout=10)
        _GATE.set()
        assert [t.get(timeout=10) for t in tokens] == [0, 1, 2, 3, 99]
        assert json.loads(json.dumps(coordinator.stats()))["policies"]["convergence"]["changes_total"] == 4
    finally:
        _GATE.set()
        coordinator.stop(timeout=10)


def test_results_are_identical_with_and_without_convergence() -> None:
    def workload(coordinator: OperationsCoordinator, between: Any) -> list[int]:
        out: list[int] = []
        for batch in range(5):
            tokens = [square(batch * 20 + i) for i in range(20)]
            out.extend(t.get(timeout=10) for t in tokens)
            between()
        return out

    with OperationsCoordinator(num_cores=2, workers_per_core=3, policies=[]) as plain:
        expected = workload(plain, lambda: None)

    clock = ManualClock()
    policy = ConvergencePolicy(interval=3600, clock=clock, hysteresis=1)
    with OperationsCoordinator(num_cores=2, workers_per_core=3, policies=[policy]) as adapted:
        got = workload(adapted, lambda: cycle(policy, clock, 1))
    assert got == expected == [i * i for i in range(100)]
    assert policy.history()  # the pattern really changed during the run


def test_background_task_runs_on_the_loop_and_stops_with_the_coordinator() -> None:
    policy = SignallingConvergence(interval=0.01)
    with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy]):
        assert policy.cycled.wait(10)
        assert policy.stats()["running"] is True and policy.stats()["cycles"] >= 1
    assert policy.stats()["running"] is False
    with pytest.raises(CoordinatorNotRunning):
        policy.step()


def test_background_task_in_attached_mode() -> None:
    async def main() -> int:
        policy = SignallingConvergence(interval=0.01)
        async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy]):
            await asyncio.get_running_loop().run_in_executor(None, policy.cycled.wait, 10)
            return int(policy.stats()["cycles"])

    assert asyncio.run(main()) >= 1
