"""Tests for tokengate.policies.sticky: reference-counted pins, ordered keys, release on every terminal path."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tokengate import (
    OperationsCoordinator,
    Overloaded,
    Policy,
    Rejected,
    TaskToken,
    TokenKilled,
    TokenState,
    TokenTimeout,
    current,
    task_token_guard,
)
from tokengate.errors import ConfigurationError, CoordinatorStopped
from tokengate.fingerprint import HashPolicy
from tokengate.policies.conductor import ConductorPolicy
from tokengate.policies.sticky import StickyPolicy
from virtual_time import NEVER, expire, virtual_loops

WAIT = 10.0
Factory = Callable[..., OperationsCoordinator]


# -- helpers shared with the other locality test modules -----------------------------


class Recorder(Policy):
    """Records every submitted and every settled token id; settles must be unique and complete."""

    name = "recorder"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.submitted: list[str] = []
        self.settled: list[str] = []

    def before_submit(self, token: TaskToken[Any]) -> None:
        with self.lock:
            self.submitted.append(token.token_id)

    def on_settle(self, token: TaskToken[Any]) -> None:
        with self.lock:
            self.settled.append(token.token_id)

    def assert_each_settled_once(self) -> None:
        with self.lock:
            settled, submitted = list(self.settled), list(self.submitted)
        assert len(settled) == len(set(settled)), "a token settled twice"
        assert set(settled) == set(submitted), "a token never settled"


class Refuse(Policy):
    """Refuses calls of the given operation types in before_submit or in admit."""

    name = "refuse"

    def __init__(self, *, at_submit: tuple[str, ...] = (), at_admit: tuple[str, ...] = ()) -> None:
        self.at_submit = at_submit
        self.at_admit = at_admit

    def before_submit(self, token: TaskToken[Any]) -> None:
        if token.operation_type in self.at_submit:
            raise Rejected("refused by test", operation_type=token.operation_type)

    def admit(self, token: TaskToken[Any]) -> bool:
        if token.operation_type in self.at_admit:
            raise Rejected("refused by test", operation_type=token.operation_type)
        return True


class RetryOnce(Policy):
    """Runs every failed first attempt once more, at once."""

    name = "retry_once"

    def after_run(self, token: TaskToken[Any]) -> float | None:
        return 0.0 if token._is_error and token.attempt == 1 else None


def start(factory: Factory, *extra: Policy, tail: tuple[Policy, ...] = (),
          **options: Any) -> tuple[OperationsCoordinator, Recorder]:
    """A started coordinator: the locality policies, *extra*, a recorder, then *tail*."""
    recorder = Recorder()
    options.setdefault("num_cores", 3)
    options.setdefault("workers_per_core", 2)
    options.setdefault("bulkhead_reserve", 0)
    policies: list[Policy] = [StickyPolicy(), ConductorPolicy(), *extra, recorder, *tail]
    return factory(policies=policies, **options), recorder


def sticky_stats(coordinator: OperationsCoordinator) -> dict[str, Any]:
    policy = coordinator.policy("sticky")
    assert policy is not None
    return policy.stats()


def here() -> tuple[int, str]:
    """(core, worker id) of the worker thread running the current call."""
    worker = current._worker_local.worker
    return worker.core_id, worker.worker_id


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.002)


def outcome(token: TaskToken[Any]) -> Any:
    """The token's result or exception, marked as retrieved (see below)."""
    try:
        return token.get(WAIT)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        if token.done() and not token.cancelled():
            # get() does not mark the future's exception as retrieved, so asyncio would log
            # "exception was never retrieved" when the token is collected (a core issue).
            token.exception()
        return exc


# -- tags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "fragment"),
    [
        ({"sticky_anchor": ""}, "non-empty string"),
        ({"sticky_anchor": 3}, "non-empty string"),
        ({"ordered": "yes"}, "True or False"),
        ({"sticky_anchor": "a", "hash_policy": "sha1"}, "HashPolicy"),
    ],
)
def test_bad_tags_fail_at_decoration(tags: dict[str, Any], fragment: str) -> None:
    # Given a bad sticky tag / When decorating / Then a ConfigurationError names it
    with pytest.raises(ConfigurationError, match=fragment):
        task_token_guard(operation_type="bad", tags=tags)(lambda: None)


def test_tag_values_are_normalized() -> None:
    f = task_token_guard(operation_type="norm", tags={"sticky_anchor": "a", "hash_policy": "FAST", "ordered": True})(
        lambda: None)
    assert f.tags["hash_policy"] is HashPolicy.FAST
    assert f.tags["ordered"] is True


def test_plain_functions_never_reach_the_policy(standalone: Factory) -> None:
    # Given a function without sticky tags
    c, recorder = start(standalone)

    @task_token_guard(operation_type="plain", tags={"weight": "light"})
    def plain() -> int:
        return 1

    # When it runs / Then no pin is ever created and the token carries no sticky data
    token = plain()
    assert token.get(WAIT) == 1
    assert sticky_stats(c)["opened_total"] == 0
    assert "sticky.ticket" not in (token.policy_data or {})
    recorder.assert_each_settled_once()


# -- pins --------------------------------------------------------------------------------


def test_cache_storm_every_key_stays_on_one_core(standalone: Factory) -> None:
    """The seeds' cache-storm demo (prior-art §8.2) as a test: 4 anchors, then 6 waves of same-key calls."""
    c, recorder = start(standalone, num_cores=3, workers_per_core=2)
    gate = threading.Event()
    ran: dict[int, set[int]] = {}
    lock = threading.Lock()

    @task_token_guard(operation_type="storm_anchor", tags={"weight": "heavy", "sticky_anchor": "storm_token"})
    def storm(n: int) -> int:
        gate.wait(WAIT)  # every call stays in flight until all waves are submitted
        with lock:
            ran.setdefault(n, set()).add(here()[0])
        return n * n

    # Given one anchor call per key
    keys = [101, 202, 303, 404]
    tokens = [storm(n) for n in keys]
    # When six waves of four same-key calls arrive while the anchors are still in flight
    for _ in range(6):
        tokens += [storm(n) for n in keys]
    stats = sticky_stats(c)
    # Then there is exactly one pin per key, each counting its 7 calls
    assert stats["pins"] == 4
    assert sorted(p["inflight"] for p in stats["listed"]) == [7, 7, 7, 7]
    assert stats["pinned_routes"] == 24  # every call after the first of its key followed the pin
    gate.set()
    assert [t.get(WAIT) for t in tokens] == [n * n for n in keys] * 7
    # And every same-key call ran on one core (distinct keys may share one)
    assert all(len(cores) == 1 for cores in ran.values()), ran
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_pinned_core_still_runs_same_key_calls_in_parallel(standalone: Factory) -> None:
    c, _ = start(standalone, num_cores=2, workers_per_core=2)
    barrier = threading.Barrier(2, timeout=WAIT)

    @task_token_guard(operation_type="pair", tags={"weight": "heavy", "sticky_anchor": "pair"})
    def pair() -> tuple[int, str]:
        barrier.wait()  # passes only if both calls run at the same time
        return here()

    # Given two calls with the same key / When both run / Then they meet: same core, two workers
    first, second = pair(), pair()
    (core1, worker1), (core2, worker2) = first.get(WAIT), second.get(WAIT)
    assert core1 == core2
    assert worker1 != worker2


def test_key_uses_arguments_and_ignores_keyword_order(standalone: Factory) -> None:
    c, _ = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="kw", tags={"weight": "heavy", "sticky_anchor": "kw"})
    def kw(a: int, b: int = 0, c: int = 0) -> None:
        gate.wait(WAIT)

    tokens = [kw(1, b=2, c=3), kw(1, c=3, b=2), kw(2, b=2, c=3)]
    stats = sticky_stats(c)
    assert stats["pins"] == 2
    assert sorted(p["inflight"] for p in stats["listed"]) == [1, 2]
    gate.set()
    for t in tokens:
        t.get(WAIT)
    assert sticky_stats(c)["pins"] == 0


def test_hash_policy_none_keys_by_anchor_alone(standalone: Factory) -> None:
    c, _ = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="anchor_only", tags={"weight": "heavy", "sticky_anchor": "acct",
                                                          "hash_policy": "none"})
    def anchor_only(n: int) -> int:
        gate.wait(WAIT)
        return here()[0]

    tokens = [anchor_only(n) for n in range(5)]
    assert sticky_stats(c)["pins"] == 1
    gate.set()
    assert len({t.get(WAIT) for t in tokens}) == 1
    assert sticky_stats(c)["pins"] == 0


def test_calls_arriving_while_the_first_waits_follow_it(standalone: Factory) -> None:
    """Regression guard for prior-art §4: a waiting first call must not let a second pin appear."""
    c, recorder = start(standalone, num_cores=3, workers_per_core=1)

    @task_token_guard(operation_type="late", tags={"weight": "heavy", "sticky_anchor": "late"})
    def late(n: int) -> int:
        return here()[0]

    # Given admission paused, so the key's first call waits unplaced
    c.pause()
    tokens = [late(7) for _ in range(6)]
    # Then the later calls wait in the policy for the first one's placement
    stats = sticky_stats(c)
    assert stats["pins"] == 1 and stats["listed"][0]["core"] is None
    assert stats["waiting_for_pin"] == 5
    # When admission resumes / Then all six run on the core the first one got
    c.resume()
    assert len({t.get(WAIT) for t in tokens}) == 1
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_killed_first_call_hands_the_pin_decision_to_the_next(standalone: Factory) -> None:
    c, recorder = start(standalone, num_cores=3, workers_per_core=1)

    @task_token_guard(operation_type="handoff", tags={"weight": "heavy", "sticky_anchor": "handoff"})
    def handoff() -> int:
        return here()[0]

    c.pause()
    first, second, third = handoff(), handoff(), handoff()
    # When the first (the one deciding the pin) is killed while waiting
    assert c.kill(first.token_id).killed
    with pytest.raises(TokenKilled):
        first.get(WAIT)
    # Then the second takes over, and the third follows the second
    wait_until(lambda: sticky_stats(c)["waiting_for_pin"] == 1)
    c.resume()
    assert second.get(WAIT) == third.get(WAIT)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_per_operation_pause_keeps_calls_on_their_pin(standalone: Factory) -> None:
    c, _ = start(standalone, num_cores=3, workers_per_core=2)
    gate = threading.Event()

    @task_token_guard(operation_type="held_op", tags={"weight": "heavy", "sticky_anchor": "held",
                                                       "hash_policy": "none"})
    def held_op(wait: bool) -> int:
        if wait:
            gate.wait(WAIT)
        return here()[0]

    # Given the key pinned by a running call
    anchor = held_op(True)
    wait_until(lambda: sticky_stats(c)["listed"][0]["core"] is not None)
    # When the operation is paused, more calls arrive, and it is resumed
    c.pause("held_op")
    later = [held_op(False) for _ in range(4)]
    c.resume("held_op")  # places them before it returns
    gate.set()
    # Then they all ran on the pinned core
    assert {t.get(WAIT) for t in later} == {anchor.get(WAIT)}


def test_settled_token_keeps_no_key(standalone: Factory) -> None:
    c, _ = start(standalone)

    @task_token_guard(operation_type="drop", tags={"weight": "heavy", "sticky_anchor": "drop"})
    def drop(payload: object) -> None:
        return None

    token = drop(("big", 1))
    token.get(WAIT)
    assert "sticky.ticket" not in (token.policy_data or {})


# -- ordered keys ----------------------------------------------------------------------


def test_ordered_key_runs_one_at_a_time_in_submission_order(standalone: Factory) -> None:
    c, recorder = start(standalone, num_cores=2, workers_per_core=4)
    lock = threading.Lock()
    order: list[int] = []
    running = [0, 0]  # now, peak

    @task_token_guard(operation_type="seq", tags={"weight": "heavy", "sticky_anchor": "seq", "ordered": True,
                                                  "hash_policy": "none"})
    def seq(i: int) -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
            order.append(i)
        time.sleep(0.002)  # widen the window in which an overlap would show
        with lock:
            running[0] -= 1

    tokens = [seq(i) for i in range(20)]
    for t in tokens:
        t.get(WAIT)
    assert order == list(range(20))
    assert running[1] == 1
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_ordered_different_keys_run_in_parallel(standalone: Factory) -> None:
    c, _ = start(standalone, num_cores=2, workers_per_core=2)
    barrier = threading.Barrier(2, timeout=WAIT)

    @task_token_guard(operation_type="per_key", tags={"weight": "heavy", "sticky_anchor": "k", "ordered": True})
    def per_key(key: str) -> str:
        barrier.wait()  # the two keys must be running at the same time
        return key

    a, b = per_key("a"), per_key("b")
    assert (a.get(WAIT), b.get(WAIT)) == ("a", "b")


def test_ordered_queue_skips_killed_and_failed_calls(standalone: Factory) -> None:
    c, recorder = start(standalone)
    gate = threading.Event()
    order: list[int] = []

    @task_token_guard(operation_type="chain", tags={"weight": "heavy", "sticky_anchor": "chain", "ordered": True,
                                                    "hash_policy": "none"})
    def chain(i: int) -> int:
        if i == 0:
            gate.wait(WAIT)
        order.append(i)
        if i == 2:
            raise ValueError("boom")
        return i

    # Given a running head and four calls queued behind it
    tokens = [chain(i) for i in range(6)]
    wait_until(lambda: sticky_stats(c)["waiting_in_order"] == 5)
    # When a queued call is killed and another fails
    assert c.kill(tokens[3].token_id).killed
    gate.set()
    # Then the queue goes on without them
    results = [outcome(t) for t in tokens]
    assert results[:2] == [0, 1] and results[4:] == [4, 5]
    assert isinstance(results[2], ValueError) and isinstance(results[3], TokenKilled)
    assert order == [0, 1, 2, 4, 5]
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_ordered_without_anchor_keys_by_the_function(standalone: Factory) -> None:
    c, _ = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="bare_ordered", tags={"weight": "heavy", "ordered": True})
    def bare_ordered(n: int) -> None:
        gate.wait(WAIT)

    tokens = [bare_ordered(1), bare_ordered(1), bare_ordered(2)]
    stats = sticky_stats(c)
    assert stats["pins"] == 2
    assert any(p["key"].startswith("('bare_ordered'") and p["ordered_queue"] == 1 for p in stats["listed"])
    gate.set()
    for t in tokens:
        t.get(WAIT)


def test_ordered_call_made_by_its_own_key_warns(standalone: Factory, caplog: pytest.LogCaptureFixture) -> None:
    c, _ = start(standalone)
    inner: list[TaskToken[Any]] = []

    @task_token_guard(operation_type="nest", tags={"weight": "heavy", "sticky_anchor": "nest", "ordered": True,
                                                   "hash_policy": "none"})
    def nest(depth: int) -> int:
        if depth == 0:
            inner.append(nest(1))  # same key: queued behind this very call
        return depth

    with caplog.at_level(logging.WARNING, logger="tokengate.policies.sticky"):
        assert nest(0).get(WAIT) == 0
        assert inner[0].get(WAIT) == 1
    assert "would deadlock" in caplog.text


def test_retry_keeps_the_key_and_releases_it_once(standalone: Factory) -> None:
    c, recorder = start(standalone, RetryOnce())
    attempts: list[int] = []

    @task_token_guard(operation_type="flaky", tags={"weight": "heavy", "sticky_anchor": "flaky", "ordered": True})
    def flaky() -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise ValueError("first attempt fails")
        return len(attempts)

    first, second = flaky(), flaky()
    assert first.get(WAIT) == 2 and first.attempt == 2
    assert second.get(WAIT) == 3  # ran after the retry: the key stayed busy during it
    stats = sticky_stats(c)
    assert stats["pins"] == 0 and stats["opened_total"] == stats["released_total"] == 1
    recorder.assert_each_settled_once()


# -- release on every terminal path ------------------------------------------------------


def test_release_on_failure(standalone: Factory) -> None:
    c, recorder = start(standalone)

    @task_token_guard(operation_type="fails", tags={"weight": "heavy", "sticky_anchor": "fails"})
    def fails() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        fails().get(WAIT)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_release_on_kill_while_waiting(standalone: Factory) -> None:
    c, recorder = start(standalone)

    @task_token_guard(operation_type="killme", tags={"weight": "heavy", "sticky_anchor": "killme", "ordered": True})
    def killme() -> None:
        return None

    c.pause()
    tokens = [killme() for _ in range(3)]
    for t in tokens:
        assert c.kill(t.token_id).killed
    for t in tokens:
        with pytest.raises(TokenKilled):
            t.get(WAIT)
    c.resume()
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_release_on_timeout_while_executing_and_while_queued(standalone: Factory) -> None:
    with virtual_loops():  # timeouts fire when the test advances the clock (tests/virtual_time.py)
        c, recorder = start(standalone)
    gate = threading.Event()
    entered = threading.Event()

    @task_token_guard(operation_type="slow", tags={"weight": "heavy", "sticky_anchor": "slow", "ordered": True,
                                                   "hash_policy": "none", "timeout": NEVER})
    def slow() -> None:
        entered.set()
        gate.wait(WAIT)

    # Given an executing call and one queued behind it, both with a timeout
    running = slow()
    assert entered.wait(WAIT)
    queued = slow()
    assert sticky_stats(c)["waiting_in_order"] == 1
    # When both time out / Then both release the key, though the first's thread still runs
    expire(c, running)
    with pytest.raises(TokenTimeout) as info:
        running.get(WAIT)
    assert info.value.started
    with pytest.raises(TokenTimeout) as info:
        queued.get(WAIT)
    assert not info.value.started
    assert sticky_stats(c)["pins"] == 0
    gate.set()
    recorder.assert_each_settled_once()


def test_release_on_overload_rejection(standalone: Factory) -> None:
    c, recorder = start(standalone, max_pending=0)

    @task_token_guard(operation_type="over", tags={"weight": "heavy", "sticky_anchor": "over"})
    def over() -> None:
        return None

    # Given a paused coordinator that may not queue anything / When a sticky call arrives
    c.pause()
    with pytest.raises(Overloaded):
        over()
    # Then it was refused and its key released
    assert sticky_stats(c)["pins"] == 0
    c.resume()
    recorder.assert_each_settled_once()


@pytest.mark.parametrize("where", ["at_submit", "at_admit"])
def test_release_when_a_later_policy_refuses(standalone: Factory, where: str) -> None:
    refuse = Refuse(**{where: ("refused",)})
    c, recorder = start(standalone, tail=(refuse,))  # after the recorder, which must see the submission

    @task_token_guard(operation_type="refused", tags={"weight": "heavy", "sticky_anchor": "r", "ordered": True})
    def refused() -> None:
        return None

    for _ in range(3):
        with pytest.raises(Rejected):
            refused()
    stats = sticky_stats(c)
    assert stats["pins"] == 0 and stats["opened_total"] == 3
    recorder.assert_each_settled_once()


def test_release_on_stop_with_work_queued(standalone: Factory) -> None:
    c, recorder = start(standalone, num_cores=1, workers_per_core=1, stop_timeout=0.1)
    gate = threading.Event()

    @task_token_guard(operation_type="stuck", tags={"weight": "heavy", "sticky_anchor": "stuck", "ordered": True,
                                                    "hash_policy": "none"})
    def stuck() -> None:
        gate.wait(WAIT)

    @task_token_guard(operation_type="loose", tags={"weight": "heavy", "sticky_anchor": "loose"})
    def loose(n: int) -> None:
        return None

    # Given a running call, ordered calls held behind it and sticky calls queued behind the busy worker
    tokens = [stuck() for _ in range(3)] + [loose(n) for n in range(3)]
    wait_until(lambda: tokens[0].state is TokenState.EXECUTING)
    # When the coordinator stops
    stopper = threading.Thread(target=c.stop)
    stopper.start()
    wait_until(lambda: all(t.done() or t.settled for t in tokens))
    gate.set()
    stopper.join(WAIT)
    # Then every call settled, the ones that never ran as stopped, and no pin is left
    assert all(isinstance(outcome(t), (CoordinatorStopped, type(None))) for t in tokens)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


# -- inspection --------------------------------------------------------------------------


def test_stats_are_bounded_and_json_ready(standalone: Factory) -> None:
    c, _ = start(standalone)

    @task_token_guard(operation_type="many", tags={"weight": "heavy", "sticky_anchor": "many"})
    def many(n: int) -> None:
        return None

    c.pause()
    tokens = [many(n) for n in range(150)]
    stats = c.stats()["policies"]["sticky"]
    json.dumps(stats)
    assert stats["pins"] == 150 and len(stats["listed"]) == 100 and stats["truncated"] is True
    c.resume()
    for t in tokens:
        t.get(WAIT)
    assert sticky_stats(c)["pins"] == 0


def test_long_keys_are_summarised() -> None:
    from tokengate.policies.sticky import _summary

    assert len(_summary(("x" * 500,))) == 80
    assert _summary(("a", 1)) == "('a', 1)"


def test_max_listed_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="max_listed"):
        StickyPolicy(max_listed=-1)
    with pytest.raises(ConfigurationError, match="max_listed"):
        ConductorPolicy(max_listed=True)


# -- races, forced deterministically with stubs -------------------------------------------


class StubToken:
    """Just what the policy reads from a token; ``state`` is set by the test."""

    def __init__(self, guarded: Any, *args: Any) -> None:
        self.guarded = guarded
        self.args: tuple[Any, ...] = args
        self.kwargs: dict[str, Any] = {}
        self.policy_data: dict[str, Any] | None = None
        self.state = TokenState.CREATED
        self.core_id: int | None = None


class StubCoordinator:
    """Records release_held() calls and the callbacks scheduled on its 'loop'."""

    name = "stub"
    running = True

    def __init__(self) -> None:
        self.released: list[Any] = []
        self.scheduled: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.loop = self

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        self.scheduled.append((callback, args))

    def release_held(self, token: Any) -> None:
        self.released.append(token)

    def run_scheduled(self) -> None:
        pending, self.scheduled = self.scheduled, []
        for callback, args in pending:
            callback(*args)


def stub_policy() -> tuple[StickyPolicy, StubCoordinator]:
    policy, coordinator = StickyPolicy(), StubCoordinator()
    policy.on_start(coordinator)  # type: ignore[arg-type]
    return policy, coordinator


@task_token_guard(operation_type="stubbed", tags={"sticky_anchor": "stub", "ordered": True, "hash_policy": "none"})
def stubbed() -> None:
    return None


def test_release_before_the_core_recorded_the_hold_is_retried() -> None:
    """Regression: release_held() ignores a token that is still CREATED, which would stall the key."""
    policy, coordinator = stub_policy()
    a, b = StubToken(stubbed), StubToken(stubbed)
    any_a: Any = a
    any_b: Any = b
    # 1. A runs: it passes admit and is placed on core 1
    policy.before_submit(any_a)
    assert policy.admit(any_a)
    a.state = TokenState.ADMITTED
    policy.on_routed(any_a, 1)
    # 2. B is held behind A; its submitting thread has not yet recorded the hold (still CREATED)
    policy.before_submit(any_b)
    assert not policy.admit(any_b)
    # 3. A settles on the loop: B is due, but a release now would be ignored by the core
    a.state = TokenState.COMPLETED
    policy.on_settle(any_a)
    assert coordinator.released == [] and coordinator.scheduled
    # 4. B's thread records the hold; the retried release now reaches the core
    b.state = TokenState.WAITING
    coordinator.run_scheduled()
    assert coordinator.released == [b]
    # 5. Re-admitted, B passes at once and goes to A's core
    assert policy.admit(any_b)
    assert policy.pick_core(any_b) == 1


def test_admit_is_idempotent_while_holding() -> None:
    policy, coordinator = stub_policy()
    a, b = StubToken(stubbed), StubToken(stubbed)
    any_a: Any = a
    any_b: Any = b
    policy.before_submit(any_a)
    policy.before_submit(any_b)
    assert policy.admit(any_a)
    # Given B held / When admit runs for it again / Then it stays held, counted once
    assert not policy.admit(any_b)
    assert not policy.admit(any_b)
    assert policy.stats()["waiting_in_order"] == 1
    # And a retry's before_submit does not count the call twice
    policy.before_submit(any_a)
    assert policy.stats()["inflight"] == 2


def test_settled_calls_waiting_for_the_pin_are_skipped() -> None:
    policy, coordinator = stub_policy()

    @task_token_guard(operation_type="unordered_stub", tags={"sticky_anchor": "u", "hash_policy": "none"})
    def unordered_stub() -> None:
        return None

    first, second, third = (StubToken(unordered_stub) for _ in range(3))
    tokens: list[Any] = [first, second, third]
    for t in tokens:
        policy.before_submit(t)
    # Given the first call deciding the pin and two waiting for it
    assert policy.admit(tokens[0]) and not policy.admit(tokens[1]) and not policy.admit(tokens[2])
    # When the second is killed while waiting, then the first is placed
    second.state = TokenState.KILLED
    policy.on_settle(tokens[1])
    for t in (first, third):
        t.state = TokenState.WAITING
    policy.on_routed(tokens[0], 2)
    coordinator.run_scheduled()
    # Then only the third is released, and it follows the pin
    assert coordinator.released == [third]
    assert policy.admit(tokens[2]) and policy.pick_core(tokens[2]) == 2


def _held_then_abandoned(policy: StickyPolicy, guarded: Any, n: int) -> None:
    """Submit *n* calls of *guarded* that the policy holds, and settle each as killed (an awaiter gave up)."""
    for _ in range(n):
        t: Any = StubToken(guarded)
        policy.before_submit(t)
        assert not policy.admit(t)
        t.state = TokenState.KILLED
        policy.on_settle(t)


def test_calls_settled_in_an_ordered_queue_do_not_pile_up() -> None:
    """Regression: killed calls queued behind a long-running call stayed in the key's deque until the head."""
    policy, coordinator = stub_policy()
    head, first = StubToken(stubbed), StubToken(stubbed)
    any_head: Any = head
    any_first: Any = first
    policy.before_submit(any_head)
    assert policy.admit(any_head)
    policy.on_routed(any_head, 1)
    policy.before_submit(any_first)
    assert not policy.admit(any_first)
    # Given a running call that never ends and a stream of callers that give up (cancelled awaiters)
    _held_then_abandoned(policy, stubbed, 1000)
    # Then the key holds O(live calls) entries, not one per call ever queued
    (pin,) = policy._pins.values()
    assert pin.queued == 1 and policy.stats()["inflight"] == 2
    assert len(pin.queue) <= 2 * pin.queued + 64 + 1
    # And the order still holds: the live queued call is next
    head.state = TokenState.COMPLETED
    first.state = TokenState.WAITING
    policy.on_settle(any_head)
    assert coordinator.released == [first]


def test_first_call_run_inline_from_pending_still_pins_its_key(standalone: Factory) -> None:
    """Regression: a key's first call run inline by a waiting worker never got on_routed, so the key
    stayed unpinned while it ran and a same-key call it waited on was held for ever (a deadlock)."""
    c, recorder = start(standalone, num_cores=1, workers_per_core=1, mailbox_size=1)

    @task_token_guard(operation_type="filler", tags={"weight": "light"})
    def filler() -> int:
        return 0

    @task_token_guard(operation_type="nest", tags={"weight": "light", "sticky_anchor": "nest",
                                                   "hash_policy": "none"})
    def nest(depth: int) -> int:
        if depth == 0:
            return here()[0]
        return nest(depth - 1).get(WAIT)

    @task_token_guard(operation_type="outer", tags={"weight": "light"})
    def outer() -> tuple[int, int]:
        # Given the only mailbox full, so the key's first call waits in the pending queue
        queued = filler()
        first = nest(1)
        assert first.state is TokenState.WAITING
        # When this worker waits on it (running it inline) and it waits on a call of its own key
        return first.get(WAIT), queued.get(WAIT)

    # Then the inner call follows the pin the inline run set, and everything settles
    assert outer().get(WAIT) == (1, 0)
    wait_until(lambda: c.inflight == 0)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_calls_settled_while_waiting_for_the_pin_do_not_pile_up() -> None:
    """Regression: killed calls waiting for an unplaced first call stayed in the key's deque until it was placed."""
    policy, coordinator = stub_policy()

    @task_token_guard(operation_type="unplaced_stub", tags={"sticky_anchor": "p", "hash_policy": "none"})
    def unplaced_stub() -> None:
        return None

    placer, live = StubToken(unplaced_stub), StubToken(unplaced_stub)
    any_placer: Any = placer
    any_live: Any = live
    policy.before_submit(any_placer)
    assert policy.admit(any_placer)
    policy.before_submit(any_live)
    assert not policy.admit(any_live)
    # Given a first call that is never placed (say, waiting for a full storage tier) and callers that give up
    _held_then_abandoned(policy, unplaced_stub, 1000)
    # Then the key holds O(live calls) entries
    (pin,) = policy._pins.values()
    assert policy.stats()["waiting_for_pin"] == 1
    assert len(pin.waiting) <= 2 * 1 + 64 + 1
    # And the live one still follows the pin once it is known
    live.state = TokenState.WAITING
    policy.on_routed(any_placer, 3)
    coordinator.run_scheduled()
    assert coordinator.released == [live]
    assert policy.admit(any_live) and policy.pick_core(any_live) == 3


@pytest.mark.parametrize("ordered", [True, False], ids=["held-in-order", "held-for-the-pin"])
def test_a_worker_waiting_on_a_held_call_runs_the_call_it_is_held_behind(standalone: Factory, ordered: bool) -> None:
    """Regression: the only worker waited (get) on a key's second call, held behind the first call, which
    sat unstarted in that same worker's queue: nobody could run it, so the wait never ended."""
    c, recorder = start(standalone, num_cores=1, workers_per_core=1, mailbox_size=1)
    order: list[int] = []
    tags: dict[str, Any] = {"weight": "light", "sticky_anchor": "held-behind", "hash_policy": "none"}
    if ordered:
        tags["ordered"] = True

    @task_token_guard(operation_type=f"held_behind.{ordered}", tags=tags)
    def step(i: int) -> int:
        order.append(i)
        return i

    @task_token_guard(operation_type=f"held_behind.filler.{ordered}", tags={"weight": "light"})
    def filler() -> int:
        return 0

    @task_token_guard(operation_type=f"held_behind.parent.{ordered}", tags={"weight": "light"})
    def parent() -> list[int]:
        # Given the only mailbox full, the key's first call queued behind this (the only) worker,
        # and its second call held behind the first
        queued = filler()
        first, second = step(1), step(2)
        assert first.state is TokenState.WAITING and second.state is TokenState.WAITING
        # When this worker waits on the second call first
        return [second.get(WAIT), first.get(WAIT), queued.get(WAIT)]

    # Then it ran the first call inline, then the second: nothing hangs, the order is kept
    assert parent().get(WAIT) == [2, 1, 0]
    assert order == [1, 2]
    wait_until(lambda: c.inflight == 0)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_a_first_call_run_inline_can_wait_on_a_later_call_held_for_its_pin(standalone: Factory) -> None:
    """Regression: the key's first call, run inline from a pending queue (so never routed), waited on a
    later call of its key that was held until the pin is known: nobody set the pin, the wait never ended."""
    c, recorder = start(standalone, num_cores=1, workers_per_core=1, mailbox_size=1)
    later: list[TaskToken[int]] = []

    @task_token_guard(operation_type="placer_waits.filler", tags={"weight": "light"})
    def filler() -> int:
        return 0

    @task_token_guard(operation_type="placer_waits.step",
                      tags={"weight": "light", "sticky_anchor": "placer-waits", "hash_policy": "none"})
    def step(i: int) -> int:
        if i == 1:
            return 10 + later[0].get(WAIT)  # the first call waits on the second
        return i

    @task_token_guard(operation_type="placer_waits.parent", tags={"weight": "light"})
    def parent() -> tuple[int, int]:
        # Given the only mailbox full, the key's first call pending, its second held for the pin
        queued = filler()
        first = step(1)
        later.append(step(2))
        assert first.state is TokenState.WAITING and later[0].state is TokenState.WAITING
        # When this worker runs the first inline and it waits on the second
        return first.get(WAIT), queued.get(WAIT)

    # Then the second is released on the first call's domain and everything settles
    assert parent().get(WAIT) == (12, 0)
    wait_until(lambda: c.inflight == 0)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()
