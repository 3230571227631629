"""Tests for tokengate.policies.tiers: per-tier slots, a FIFO that never holds a worker, release on every path."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tokengate import OperationsCoordinator, TokenKilled, TokenState, TokenTimeout, task_token_guard
from tokengate.errors import ConfigurationError
from tokengate.policies.retries import RetryPolicy
from tokengate.policies.tiers import DEFAULT_TIER_LIMITS, StorageSpeed, StorageTierPolicy
from virtual_time import NEVER, expire, start_virtual

WAIT = 5.0  # upper bound for any single wait; tests finish far sooner


class FakeClock:
    """A manual monotonic clock: wait times become exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition the loop thread makes true (bounded; fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


def tier(policy: StorageTierPolicy, name: str = "slow") -> dict[str, Any]:
    return dict(policy.stats()["tiers"][name])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # never leave a worker blocked, even when a test fails


def start(policy: StorageTierPolicy, *, workers_per_core: int = 4, extra: list[Any] | None = None
          ) -> OperationsCoordinator:
    return OperationsCoordinator(num_cores=1, workers_per_core=workers_per_core,
                                 policies=[*(extra or []), policy], stop_timeout=2.0).start()


# ---------------------------------------------------------------------------
# The core property: waiting for a tier never occupies a worker


def test_waiting_tier_tokens_hold_no_worker(gate: threading.Event, clock: FakeClock) -> None:
    # Given a SLOW limit of 1 on a 4-worker coordinator, and slow calls that block until the gate opens
    policy = StorageTierPolicy(limits={"slow": 1}, clock=clock)
    order: list[int] = []
    running = threading.Event()

    @task_token_guard(operation_type="tiers.slow_read", tags={"storage_speed": "slow"})
    def slow_read(i: int) -> int:
        running.set()
        gate.wait(WAIT)
        order.append(i)
        return i

    @task_token_guard(operation_type="tiers.untiered")
    def untiered() -> str:
        return "done"

    c = start(policy)
    try:
        # When three slow calls and then an untiered call are submitted
        slow = [slow_read(i) for i in range(3)]
        assert running.wait(WAIT)
        # Then the untiered call completes while the slow ones are still blocked or waiting
        assert untiered().get(WAIT) == "done"
        assert [t.state for t in slow] == [TokenState.EXECUTING, TokenState.WAITING, TokenState.WAITING]
        stats = tier(policy)
        assert (stats["limit"], stats["active"], stats["waiting"], stats["total"]) == (1, 1, 2, 1)
        assert c.stats()["counts"]["executing"] == 1

        # When the gate opens after 10 (fake) seconds
        clock.now += 10.0
        gate.set()
        # Then they run one at a time, in submission order
        assert [t.get(WAIT) for t in slow] == [0, 1, 2]
        assert order == [0, 1, 2]
        stats = tier(policy)
        assert (stats["active"], stats["waiting"], stats["total"], stats["waited"], stats["peak_active"]) == (
            0, 0, 3, 2, 1)
        assert stats["max_wait"] == 10.0
        assert stats["mean_wait"] == pytest.approx(20.0 / 3)
    finally:
        c.stop()


def test_tier_limit_allows_that_many_at_once(gate: threading.Event) -> None:
    # Given a FAST limit of 2 and 4 workers
    policy = StorageTierPolicy(limits={"FAST": 2})
    started = threading.Semaphore(0)

    @task_token_guard(operation_type="tiers.fast_write", tags={"storage_speed": StorageSpeed.FAST})
    def fast_write() -> None:
        started.release()
        gate.wait(WAIT)

    c = start(policy)
    try:
        # When four calls are submitted
        tokens = [fast_write() for _ in range(4)]
        assert started.acquire(timeout=WAIT) and started.acquire(timeout=WAIT)
        # Then exactly two execute and two wait
        stats = tier(policy, "fast")
        assert (stats["active"], stats["waiting"]) == (2, 2)
        assert sorted(t.state.value for t in tokens) == ["executing", "executing", "waiting", "waiting"]
        gate.set()
        for t in tokens:
            t.get(WAIT)
        assert tier(policy, "fast")["peak_active"] == 2
    finally:
        c.stop()


def test_tiers_are_independent(gate: threading.Event) -> None:
    # Given SLOW full (limit 1), a MODERATE call is not held behind it
    policy = StorageTierPolicy(limits={"slow": 1, "moderate": 1})

    @task_token_guard(operation_type="tiers.blocker", tags={"storage_speed": "slow"})
    def blocker() -> None:
        gate.wait(WAIT)

    @task_token_guard(operation_type="tiers.moderate", tags={"storage_speed": "moderate"})
    def moderate() -> int:
        return 7

    c = start(policy)
    try:
        first = blocker()
        second = blocker()
        # When a moderate call is made; Then it completes while SLOW is still full
        assert moderate().get(WAIT) == 7
        assert second.state is TokenState.WAITING
        gate.set()
        first.get(WAIT)
        second.get(WAIT)
    finally:
        c.stop()


# ---------------------------------------------------------------------------
# Release on every path


def test_killed_waiting_token_leaves_the_fifo(gate: threading.Event) -> None:
    # Given limit 1: A holds the slot, B and C wait
    policy = StorageTierPolicy(limits={"slow": 1})
    ran: list[str] = []

    @task_token_guard(operation_type="tiers.job", tags={"storage_speed": "slow"})
    def job(name: str) -> str:
        if name == "A":
            gate.wait(WAIT)
        ran.append(name)
        return name

    c = start(policy)
    try:
        a, b, cc = job("A"), job("B"), job("C")
        wait_until(lambda: a.state is TokenState.EXECUTING)
        # When B is killed while it waits for the tier
        assert c.kill(b.token_id).killed
        with pytest.raises(TokenKilled):
            b.get(WAIT)
        # Then it no longer counts as waiting, and C (not B) gets the slot next
        assert tier(policy)["waiting"] == 1
        gate.set()
        assert a.get(WAIT) == "A" and cc.get(WAIT) == "C"
        assert ran == ["A", "C"]
        stats = tier(policy)
        assert (stats["active"], stats["waiting"], stats["total"]) == (0, 0, 2)
    finally:
        c.stop()


def test_timed_out_waiting_token_leaves_the_fifo(gate: threading.Event) -> None:
    # Given limit 1 held by a gated call, and a second call with a short timeout behind it
    policy = StorageTierPolicy(limits={"slow": 1})

    @task_token_guard(operation_type="tiers.holder", tags={"storage_speed": "slow"})
    def holder() -> str:
        gate.wait(WAIT)
        return "held"

    @task_token_guard(operation_type="tiers.impatient", tags={"storage_speed": "slow", "timeout": 0.05})
    def impatient() -> str:
        return "never"

    c = start(policy)
    try:
        a = holder()
        b = impatient()
        # When the waiting call times out
        with pytest.raises(TokenTimeout) as info:
            b.get(WAIT)
        # Then it never started, and left the tier's FIFO
        assert info.value.started is False
        assert b.state is TokenState.TIMEOUT
        assert (tier(policy)["active"], tier(policy)["waiting"]) == (1, 0)
        gate.set()
        assert a.get(WAIT) == "held"
        assert holder().get(WAIT) == "held"
        assert (tier(policy)["active"], tier(policy)["total"]) == (0, 2)
    finally:
        c.stop()


def test_timeout_while_executing_releases_the_slot(gate: threading.Event) -> None:
    # Given limit 1 held by a call that times out while it runs, and a call waiting behind it
    policy = StorageTierPolicy(limits={"slow": 1})
    entered = threading.Event()

    # The timeout fires when the test advances the loop's virtual clock, after A started.
    @task_token_guard(operation_type="tiers.stuck", tags={"storage_speed": "slow", "timeout": NEVER})
    def stuck() -> None:
        entered.set()
        gate.wait(WAIT)

    @task_token_guard(operation_type="tiers.next", tags={"storage_speed": "slow"})
    def nxt() -> str:
        return "next"

    c = start_virtual(OperationsCoordinator(num_cores=1, workers_per_core=4, policies=[policy], stop_timeout=2.0))
    try:
        a = stuck()
        assert entered.wait(WAIT)
        b = nxt()
        assert tier(policy)["waiting"] == 1
        # When A times out; Then its slot passes to B, which completes while A's thread still runs
        expire(c, a)
        with pytest.raises(TokenTimeout) as info:
            a.get(WAIT)
        assert info.value.started
        assert b.get(WAIT) == "next"
        assert tier(policy)["active"] == 0
    finally:
        gate.set()
        c.stop()


def test_killed_admitted_token_releases_its_slot(gate: threading.Event) -> None:
    # Given one worker and limit 2: A runs (gated), B got a slot but sits in A's worker mailbox
    policy = StorageTierPolicy(limits={"slow": 2})

    @task_token_guard(operation_type="tiers.queued", tags={"storage_speed": "slow"})
    def queued(i: int) -> int:
        gate.wait(WAIT)
        return i

    c = start(policy, workers_per_core=1)
    try:
        a = queued(1)
        b = queued(2)
        wait_until(lambda: a.state is TokenState.EXECUTING)
        assert b.state is TokenState.ADMITTED
        assert tier(policy)["active"] == 2
        # When B is killed before it runs
        assert c.kill(b.token_id).killed
        with pytest.raises(TokenKilled):
            b.get(WAIT)
        # Then its slot is free again
        assert tier(policy)["active"] == 1
        gate.set()
        assert a.get(WAIT) == 1
        assert tier(policy)["active"] == 0
    finally:
        c.stop()


def test_stop_settles_waiting_tokens_and_frees_everything(gate: threading.Event) -> None:
    # Given limit 1, a blocked call and two waiting ones
    policy = StorageTierPolicy(limits={"slow": 1})

    @task_token_guard(operation_type="tiers.long", tags={"storage_speed": "slow"})
    def long() -> None:
        gate.wait(WAIT)

    c = start(policy)
    tokens = [long() for _ in range(3)]
    wait_until(lambda: tokens[0].state is TokenState.EXECUTING)
    # When the coordinator stops without waiting
    c.stop(timeout=0)
    # Then every token is settled, and no slot or waiter is left behind
    assert all(t.settled for t in tokens)
    assert tokens[1].state is TokenState.KILLED and tokens[2].state is TokenState.KILLED
    stats = tier(policy)
    assert (stats["active"], stats["waiting"]) == (0, 0)


def test_each_retry_attempt_takes_its_own_slot() -> None:
    # Given a slow call that fails twice, then succeeds, with retries on
    policy = StorageTierPolicy(limits={"slow": 1})
    calls = [0]

    @task_token_guard(operation_type="tiers.flaky",
                      tags={"storage_speed": "slow", "retries": 2, "retry_backoff": 0})
    def flaky() -> int:
        calls[0] += 1
        if calls[0] < 3:
            raise OSError("disk busy")
        return calls[0]

    c = start(policy, extra=[RetryPolicy()])
    try:
        # When it is awaited; Then it succeeds on attempt 3, and each attempt took and released a slot
        token = flaky()
        assert token.get(WAIT) == 3
        assert token.attempt == 3
        stats = tier(policy)
        assert (stats["active"], stats["waiting"], stats["total"]) == (0, 0, 3)
    finally:
        c.stop()


def test_untiered_functions_are_ignored() -> None:
    policy = StorageTierPolicy()

    @task_token_guard(operation_type="tiers.plain")
    def plain() -> int:
        return 1

    assert policy.interested(plain) is False
    c = start(policy)
    try:
        assert plain().get(WAIT) == 1
        assert all(t["total"] == 0 for t in policy.stats()["tiers"].values())
    finally:
        c.stop()


# ---------------------------------------------------------------------------
# admit / release without a coordinator: FIFO, idempotence, stale entries


class StubToken:
    """The attributes of a TaskToken the policy reads."""

    def __init__(self, speed: str) -> None:
        self.tags = {"storage_speed": StorageSpeed(speed)}
        self.policy_data: dict[str, Any] | None = None
        self.settled = False


class StubCoordinator:
    def __init__(self, policy: StorageTierPolicy) -> None:
        self.released: list[StubToken] = []
        self.policy = policy
        self.policies = (policy,)

    def release_held(self, token: StubToken) -> None:
        self.released.append(token)
        # Like the core: release_held runs admit again; it must say yes at once.
        assert self.policy.admit(token) is True  # type: ignore[arg-type]


def stub_policy(limit: int) -> tuple[StorageTierPolicy, StubCoordinator]:
    policy = StorageTierPolicy(limits={"slow": limit})
    coordinator = StubCoordinator(policy)
    policy.on_start(coordinator)  # type: ignore[arg-type]
    return policy, coordinator


def test_admit_is_idempotent_and_fifo() -> None:
    policy, coordinator = stub_policy(1)
    a, b, c = StubToken("slow"), StubToken("slow"), StubToken("slow")
    admit: Any = policy.admit
    # Given A holds the only slot and B, C wait
    assert admit(a) is True
    assert admit(a) is True  # asked again (a release by another policy): no second slot
    assert admit(b) is False and admit(c) is False
    assert admit(b) is False  # asked again while waiting: not queued twice
    assert (tier(policy)["active"], tier(policy)["waiting"]) == (1, 2)
    # When A's attempt finishes; Then B (the oldest) gets the slot and is handed back
    policy.after_run(a)  # type: ignore[arg-type]
    assert coordinator.released == [b]
    policy.after_run(a)  # type: ignore[arg-type]  # a second release of the same attempt is a no-op
    assert (tier(policy)["active"], tier(policy)["waiting"]) == (1, 1)
    policy.after_run(b)  # type: ignore[arg-type]
    assert coordinator.released == [b, c]
    policy.on_settle(c)  # type: ignore[arg-type]  # settling after the attempt: nothing left to free
    policy.after_run(c)  # type: ignore[arg-type]
    assert (tier(policy)["active"], tier(policy)["waiting"], tier(policy)["total"]) == (0, 0, 3)


def test_newcomer_never_overtakes_waiters() -> None:
    policy, coordinator = stub_policy(1)
    admit: Any = policy.admit
    a, b = StubToken("slow"), StubToken("slow")
    assert admit(a) is True and admit(b) is False
    # When A's slot passes to B; Then a newcomer waits behind, even though nothing else is queued
    policy.after_run(a)  # type: ignore[arg-type]
    newcomer = StubToken("slow")
    assert admit(newcomer) is False
    assert tier(policy)["waiting"] == 1


def test_settled_waiters_are_skipped_and_compacted() -> None:
    policy, coordinator = stub_policy(1)
    admit: Any = policy.admit
    holder = StubToken("slow")
    assert admit(holder) is True
    # Given many waiters that are killed while they wait (their on_settle runs)
    dead = [StubToken("slow") for _ in range(300)]
    for t in dead:
        assert admit(t) is False
        t.settled = True
        policy.on_settle(t)  # type: ignore[arg-type]
    alive = StubToken("slow")
    assert admit(alive) is False
    # Then only the live waiter counts, and the FIFO was compacted (stale entries bounded)
    assert tier(policy)["waiting"] == 1
    assert len(policy._tiers[StorageSpeed.SLOW].queue) <= 2 * 1 + 64 + 1
    # And a release skips the dead ones and hands the slot to the live one
    policy.after_run(holder)  # type: ignore[arg-type]
    assert coordinator.released == [alive]


def test_settled_but_not_yet_notified_waiter_is_skipped() -> None:
    policy, coordinator = stub_policy(1)
    admit: Any = policy.admit
    holder, killed, alive = StubToken("slow"), StubToken("slow"), StubToken("slow")
    assert admit(holder) is True and admit(killed) is False and admit(alive) is False
    # Given a waiter that is already terminal but whose on_settle has not run yet
    killed.settled = True
    # When the slot is released; Then it goes to the live waiter, and the late on_settle changes nothing
    policy.after_run(holder)  # type: ignore[arg-type]
    assert coordinator.released == [alive]
    policy.on_settle(killed)  # type: ignore[arg-type]
    assert (tier(policy)["active"], tier(policy)["waiting"]) == (1, 0)


# ---------------------------------------------------------------------------
# Configuration


def test_defaults_and_partial_override() -> None:
    assert StorageTierPolicy().limits == {"slow": 10, "moderate": 25, "fast": 50, "insane": 70}
    assert {k.value: v for k, v in DEFAULT_TIER_LIMITS.items()} == StorageTierPolicy().limits
    # A partial dict overrides only the tiers it names; keys are case-insensitive or enum members
    policy = StorageTierPolicy(limits={"Slow": 4, StorageSpeed.INSANE: 100})
    assert policy.limits == {"slow": 4, "moderate": 25, "fast": 50, "insane": 100}


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ({"turbo": 3}, "unknown storage tier 'turbo'; use one of slow, moderate, fast, insane"),
        ({"slow": 0}, "limits['slow'] must be an integer from 1"),
        ({"slow": True}, "limits['slow'] must be an integer"),
        ({"fast": 2.5}, "got 2.5"),
        ({3: 1}, "storage tier must be a string"),
        ([("slow", 1)], "limits must be a dict"),
    ],
)
def test_bad_limits_are_rejected_at_construction(limits: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        StorageTierPolicy(limits=limits)
    assert fragment in str(info.value)


def test_a_clock_that_is_not_callable_is_rejected_at_construction() -> None:
    # Otherwise the first full tier raises in admit, which is logged and admits the call: no cap at all
    with pytest.raises(ConfigurationError) as info:
        StorageTierPolicy(clock=5)  # type: ignore[arg-type]
    assert "clock must be a callable returning seconds" in str(info.value)


def test_tag_is_normalized_case_insensitively() -> None:
    @task_token_guard(operation_type="tiers.norm", tags={"storage_speed": "  InSaNe "})
    def f() -> None: ...

    assert f.tags["storage_speed"] is StorageSpeed.INSANE
    assert json.dumps(f.tags["storage_speed"]) == '"insane"'


@pytest.mark.parametrize("value", ["warp", "", 3, None])
def test_unknown_tier_is_a_configuration_error_at_decoration(value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        @task_token_guard(operation_type="tiers.bad", tags={"storage_speed": value})
        def f() -> None: ...
    message = str(info.value)
    assert "storage_speed" in message and "slow, moderate, fast, insane" in message


def test_stats_are_json_ready() -> None:
    stats = StorageTierPolicy().stats()
    assert json.loads(json.dumps(stats)) == stats
    assert set(stats["tiers"]) == {"slow", "moderate", "fast", "insane"}
    assert set(stats["tiers"]["slow"]) >= {"limit", "active", "waiting", "total", "mean_wait"}


def test_a_policy_that_may_hold_calls_after_the_tiers_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from tokengate.policies import default_policies
    from tokengate.policies.sticky import StickyPolicy

    # Given the tiers installed before the sticky policy (which holds ordered calls)
    with caplog.at_level("WARNING", logger="tokengate.policies.tiers"):
        OperationsCoordinator(num_cores=1, policies=[StorageTierPolicy(), StickyPolicy()]).start().stop()
    # Then the start warns that a held call would keep its tier slot
    assert any("installed before sticky" in r.getMessage() for r in caplog.records)
    caplog.clear()
    # and the default order (tiers after every policy that may hold) is quiet
    with caplog.at_level("WARNING", logger="tokengate.policies.tiers"):
        OperationsCoordinator(num_cores=1, policies=default_policies()).start().stop()
    assert not [r for r in caplog.records if r.name == "tokengate.policies.tiers"]


def test_a_worker_waiting_on_a_call_queued_for_a_slot_runs_the_slot_holder() -> None:
    """Regression: the only worker waited (get) on a call queued for the tier's one slot, whose holder
    sat unstarted in that same worker's mailbox: nobody could run it, so the wait never ended."""
    policy = StorageTierPolicy({"slow": 1})
    c = start(policy, workers_per_core=1)
    order: list[int] = []

    @task_token_guard(operation_type="tier.held_behind", tags={"storage_speed": "slow", "weight": "light"})
    def read(i: int) -> int:
        order.append(i)
        return i

    @task_token_guard(operation_type="tier.held_behind.parent", tags={"weight": "light"})
    def parent() -> list[int]:
        # Given the slot taken by a call queued behind this (the only) worker, and a second call in the FIFO
        first, second = read(1), read(2)
        assert tier(policy)["waiting"] == 1
        # When this worker waits on the second call first
        return [second.get(5.0), first.get(5.0)]

    try:
        # Then it ran the slot holder inline, then the second: nothing hangs, the tier stays at one at a time
        assert parent().get(10.0) == [2, 1]
        assert order == [1, 2]
        assert tier(policy)["peak_active"] == 1
    finally:
        c.stop()
