"""Tests for tokengate.policies.reputation: counters, health classes, auto-block and unblock."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokengate import OperationBlocked, OperationsCoordinator, TokenKilled, TokenTimeout, task_token_guard
from tokengate.errors import ConfigurationError
from tokengate.states import TokenState
from tokengate.policies.reputation import Health, ReputationPolicy, classify_health

from virtual_time import NEVER, expire, start_virtual

WAIT = 5.0


class Boom(Exception):
    pass


@task_token_guard(operation_type="rep.work")
def work(fail: bool | type[Exception] = False) -> str:
    if fail is True:
        raise Boom("failed on purpose")
    if isinstance(fail, type):
        raise fail("failed on purpose")
    return "ok"


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def run(policy: ReputationPolicy) -> OperationsCoordinator:
    """A started coordinator whose timeouts fire only when the test calls expire() (see tests/virtual_time.py)."""
    return start_virtual(OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy], stop_timeout=2.0))


def call(fail: bool | type[Exception] = False) -> str | BaseException:
    """Run one call of `work` to its end; return its value or its exception."""
    try:
        return work(fail).get(WAIT)
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return exc


def row(policy: ReputationPolicy, op: str = "rep.work") -> dict[str, Any]:
    rows = policy.reputation(op)
    assert len(rows) == 1
    return rows[0]


# ---------------------------------------------------------------------------
# Health classes (pure)


@pytest.mark.parametrize(
    ("attempts", "successes", "health"),
    [
        (0, 0, Health.UNKNOWN),
        (4, 4, Health.UNKNOWN),
        (4, 0, Health.UNKNOWN),
        (5, 5, Health.EXCELLENT),
        (20, 19, Health.EXCELLENT),  # exactly 95 %
        (100, 94, Health.HEALTHY),
        (10, 8, Health.HEALTHY),  # exactly 80 %
        (100, 79, Health.AT_RISK),
        (10, 5, Health.AT_RISK),  # exactly 50 %
        (100, 49, Health.PROBLEMATIC),
        (5, 0, Health.PROBLEMATIC),
    ],
)
def test_health_classes(attempts: int, successes: int, health: Health) -> None:
    assert classify_health(attempts, successes) is health


# ---------------------------------------------------------------------------
# Recording


def test_attempts_successes_and_failures_by_type() -> None:
    # Given a passive policy
    policy = ReputationPolicy()
    c = run(policy)
    try:
        # When an operation succeeds 4 times and fails twice with two exception types
        for _ in range(4):
            assert call() == "ok"
        assert isinstance(call(True), Boom)
        assert isinstance(call(KeyError), KeyError)
        # Then the row counts them, and 4 of 6 (67 %) is AT_RISK
        r = row(policy)
        assert (r["attempts"], r["successes"], r["failures"]) == (6, 4, 2)
        assert r["failures_by_type"] == {"Boom": 1, "KeyError": 1}
        assert r["completion_rate"] == pytest.approx(4 / 6)
        assert r["health"] == "at_risk"
        rt = r["run_time"]
        assert rt["samples"] == 6
        assert 0 <= rt["min"] <= rt["mean"] <= rt["max"]
        assert rt["min"] <= rt["p95"] <= rt["max"]
        assert r["last_seen"] >= r["first_seen"]
        assert r["blocked"] is False
    finally:
        c.stop()


def test_fewer_than_five_attempts_is_unknown_then_excellent() -> None:
    policy = ReputationPolicy()
    c = run(policy)
    try:
        for _ in range(4):
            call()
        assert row(policy)["health"] == "unknown"
        call()
        assert row(policy)["health"] == "excellent"
    finally:
        c.stop()


def test_timeouts_are_failed_attempts(gate: threading.Event) -> None:
    entered = threading.Event()

    @task_token_guard(operation_type="rep.slow", tags={"timeout": NEVER})
    def slow() -> None:
        entered.set()
        gate.wait(WAIT)

    policy = ReputationPolicy()
    c = run(policy)
    try:
        # When a call times out while running
        token = slow()
        assert entered.wait(WAIT)
        expire(c, token)
        with pytest.raises(TokenTimeout) as info:
            token.get(WAIT)
        assert info.value.started
        # Then it is one attempt, a timeout, not a success
        r = row(policy, "rep.slow")
        assert (r["attempts"], r["timeouts"], r["successes"], r["failures"]) == (1, 1, 0, 0)
        assert r["recent_failure_rate"] == 1.0
    finally:
        gate.set()
        c.stop()


def test_kills_are_counted_but_are_not_attempts() -> None:
    policy = ReputationPolicy()
    c = run(policy)
    try:
        # Given admission is paused, so the call waits
        c.pause()
        token = work()
        # When it is killed before it runs
        assert c.kill(token.token_id).killed
        with pytest.raises(TokenKilled):
            token.get(WAIT)
        # Then it counts as a kill, not an attempt
        r = row(policy)
        assert (r["kills"], r["attempts"]) == (1, 0)
        assert r["health"] == "unknown"
    finally:
        c.resume()
        c.stop()


def test_attempt_finishing_during_stop_is_recorded(gate: threading.Event) -> None:
    @task_token_guard(operation_type="rep.during_stop")
    def during_stop() -> str:
        gate.wait(WAIT)
        return "late"

    policy = ReputationPolicy()
    c = run(policy)
    token = during_stop()
    # Given a call still running when stop() begins (the coordinator skips after_run while stopping)
    stopper = threading.Thread(target=c.stop)
    stopper.start()
    for _ in range(5000):  # bounded: at most ~5 s
        if not c.running:
            break
        time.sleep(0.001)
    assert not c.running
    # When it finishes during the graceful stop
    gate.set()
    stopper.join(WAIT)
    # Then it is still recorded as a successful attempt
    assert token.get(WAIT) == "late"
    r = row(policy, "rep.during_stop")
    assert (r["attempts"], r["successes"]) == (1, 1)


def test_keyed_by_operation_type_not_function_name() -> None:
    def make(op: str) -> Any:
        @task_token_guard(operation_type=op)
        def same_name() -> int:
            return 1

        return same_name

    a, b, shared1, shared2 = make("rep.a"), make("rep.b"), make("rep.shared"), make("rep.shared")
    policy = ReputationPolicy()
    c = run(policy)
    try:
        for f in (a, b, b, shared1, shared2):
            f().get(WAIT)
        # Same __name__, different operation types: separate rows; one operation type: one row
        assert row(policy, "rep.a")["attempts"] == 1
        assert row(policy, "rep.b")["attempts"] == 2
        assert row(policy, "rep.shared")["attempts"] == 2
        assert policy.reputation("same_name") == []
    finally:
        c.stop()


def test_tracked_operations_are_bounded_lru() -> None:
    policy = ReputationPolicy(max_operations=2)
    c = run(policy)
    try:
        ops = []
        for name in ("rep.x", "rep.y", "rep.z"):
            @task_token_guard(operation_type=name)
            def f() -> None: ...

            ops.append(f)
        ops[0]().get(WAIT)
        ops[1]().get(WAIT)
        ops[0]().get(WAIT)  # x is now more recent than y
        ops[2]().get(WAIT)  # z evicts the least recently seen: y
        stats = policy.stats()
        assert set(stats["operations"]) == {"rep.x", "rep.z"}
        assert (stats["operations_tracked"], stats["max_operations"], stats["evicted_operations"]) == (2, 2, 1)
        assert [r["operation_type"] for r in policy.reputation()] == ["rep.z", "rep.x"]
    finally:
        c.stop()


def test_stats_are_json_ready() -> None:
    policy = ReputationPolicy()
    c = run(policy)
    try:
        call()
        call(True)
        policy.block("rep.other")
        stats = policy.stats()
        assert json.loads(json.dumps(stats)) == stats
        assert stats["health_distribution"]["unknown"] == 1
        assert stats["blocked"] == {"rep.other": "blocked by operator"}
        assert c.stats()["policies"]["reputation"]["operations_tracked"] == 1
    finally:
        c.stop()


# ---------------------------------------------------------------------------
# Blocking


def test_passive_by_default_never_blocks() -> None:
    policy = ReputationPolicy()
    c = run(policy)
    try:
        # When an operation fails 25 times in a row
        for _ in range(25):
            assert isinstance(call(True), Boom)
        # Then it is PROBLEMATIC but still accepted
        assert row(policy)["health"] == "problematic"
        assert policy.blocked() == []
        assert call() == "ok"
    finally:
        c.stop()


def test_auto_block_after_threshold_and_unblock(caplog: pytest.LogCaptureFixture) -> None:
    # Given auto-block at 80 % over the last 10 attempts, once 5 are known
    policy = ReputationPolicy(auto_block=True, block_threshold=0.8, block_window=10, block_min_attempts=5)
    c = run(policy)
    try:
        with caplog.at_level(logging.WARNING, logger="tokengate.policies.reputation"):
            # When 4 calls fail: not enough attempts yet, so no block
            for _ in range(4):
                assert isinstance(call(True), Boom)
            assert policy.blocked() == []
            # When the 5th fails
            assert isinstance(call(True), Boom)
            # Then the operation is blocked, and a new call is refused before it runs
            assert policy.blocked() == ["rep.work"]
            with pytest.raises(OperationBlocked) as info:
                work()
            assert info.value.operation_type == "rep.work"
            assert "unblock('rep.work')" in str(info.value)
            assert row(policy)["attempts"] == 5  # the refused call never ran
            assert row(policy)["refused_while_blocked"] == 1
            assert row(policy)["blocked"] is True
            assert any("blocked" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

            # When it is unblocked
            caplog.clear()
            assert policy.unblock("rep.work") is True
            assert any("unblocked" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        # Then calls are accepted again, and one more failure does not re-block (the window was reset)
        assert policy.blocked() == []
        assert isinstance(call(True), Boom)
        assert policy.blocked() == []
        assert call() == "ok"
        # Lifetime counters are kept
        assert row(policy)["attempts"] == 7
    finally:
        c.stop()


def test_failure_rate_below_threshold_does_not_block() -> None:
    policy = ReputationPolicy(auto_block=True, block_threshold=0.9, block_window=20, block_min_attempts=10)
    c = run(policy)
    try:
        # When 1 in 5 calls succeeds (80 % failures < 90 %)
        for i in range(30):
            call(i % 5 != 0)
        # Then nothing is blocked
        assert policy.blocked() == []
        assert row(policy)["recent_failure_rate"] == pytest.approx(0.8)
    finally:
        c.stop()


def test_window_of_ten_blocks_at_nine_failures() -> None:
    policy = ReputationPolicy(auto_block=True, block_threshold=0.9, block_window=10, block_min_attempts=10)
    c = run(policy)
    try:
        for _ in range(30):
            call()
        for _ in range(8):
            call(True)
        # 8 of the last 10 failed: below 90 %
        assert policy.blocked() == []
        call(True)
        # 9 of the last 10 failed: 90 % >= 90 %, although the lifetime rate is 9 of 39
        assert policy.blocked() == ["rep.work"]
        assert row(policy)["completion_rate"] == pytest.approx(30 / 39)
    finally:
        c.stop()


def test_manual_block_and_unblock() -> None:
    policy = ReputationPolicy()  # manual blocks work without auto_block
    c = run(policy)
    try:
        assert policy.block("rep.work", reason="maintenance") is True
        assert policy.block("rep.work") is False  # already blocked
        assert policy.is_blocked("rep.work")
        with pytest.raises(OperationBlocked) as info:
            work()
        assert "maintenance" in str(info.value)
        assert c.stats()["counts"]["rejected_at_submit"] == 1
        assert policy.unblock("rep.work") is True
        assert policy.unblock("rep.work") is False  # not blocked any more
        assert call() == "ok"
    finally:
        c.stop()


@pytest.mark.parametrize("bad", ["", None, 3])
def test_block_needs_an_operation_type(bad: Any) -> None:
    policy = ReputationPolicy()
    with pytest.raises(ConfigurationError, match="operation_type must be a non-empty string"):
        policy.block(bad)
    with pytest.raises(ConfigurationError, match="operation_type must be a non-empty string"):
        policy.unblock(bad)


# ---------------------------------------------------------------------------
# Which exceptions are the operation's fault: ignore / count_on


class InvalidInput(ValueError):
    """A validation error: the caller's fault, not the operation's."""


def test_ignored_exceptions_never_block_and_are_not_attempts() -> None:
    # Given auto-block at 90 % over the last 10 attempts, with validation errors ignored
    policy = ReputationPolicy(auto_block=True, block_threshold=0.9, block_window=10, block_min_attempts=5,
                              ignore=InvalidInput)
    c = run(policy)
    try:
        assert call() == "ok"
        # When anonymous callers send 30 invalid inputs in a row
        for _ in range(30):
            assert isinstance(call(InvalidInput), InvalidInput)  # the caller still gets its exception
        # Then the operation is not blocked: the failures were not its fault
        assert policy.blocked() == []
        r = row(policy)
        assert (r["attempts"], r["successes"], r["failures"], r["ignored"]) == (1, 1, 0, 30)
        assert r["ignored_by_type"] == {"InvalidInput": 30} and r["failures_by_type"] == {}
        assert (r["recent_attempts"], r["recent_failure_rate"], r["completion_rate"]) == (1, 0.0, 1.0)
        assert r["run_time"]["samples"] == 1  # an ignored run adds no run time
        # And its own failures still count and still block
        for _ in range(8):
            assert isinstance(call(True), Boom)
        assert policy.blocked() == []  # 8 of the last 9 attempts: 89 %
        assert isinstance(call(True), Boom)
        assert policy.blocked() == ["rep.work"]  # 9 of 10
        assert row(policy)["failures_by_type"] == {"Boom": 9}
    finally:
        c.stop()


def test_count_on_counts_only_the_named_exceptions_and_ignore_wins() -> None:
    # Given only RuntimeError is the operation's fault, except its subclass RecursionError
    policy = ReputationPolicy(count_on=(RuntimeError, Boom), ignore=[RecursionError])
    c = run(policy)
    try:
        outcomes = [call(RuntimeError), call(True), call(KeyError), call(RecursionError), call(InvalidInput)]
        assert [type(o) for o in outcomes] == [RuntimeError, Boom, KeyError, RecursionError, InvalidInput]
        r = row(policy)
        assert (r["attempts"], r["failures"], r["ignored"]) == (2, 2, 3)
        assert r["failures_by_type"] == {"RuntimeError": 1, "Boom": 1}
        assert r["ignored_by_type"] == {"KeyError": 1, "RecursionError": 1, "InvalidInput": 1}
        stats = policy.stats()
        assert stats["count_on"] == ["builtins.RuntimeError", f"{__name__}.Boom"]
        assert stats["ignore"] == ["builtins.RecursionError"]
        json.dumps(stats)
    finally:
        c.stop()


def test_ignore_does_not_apply_to_timeouts(gate: threading.Event) -> None:
    # A timeout is not an exception of the function's own: it always counts, whatever ignore says
    entered = threading.Event()

    @task_token_guard(operation_type="rep.ignored_timeout", tags={"timeout": NEVER})
    def slow() -> None:
        entered.set()
        gate.wait(WAIT)

    policy = ReputationPolicy(ignore=(TimeoutError, TokenTimeout, BaseException))
    c = run(policy)
    try:
        token = slow()
        assert entered.wait(WAIT)
        expire(c, token)
        with pytest.raises(TokenTimeout):
            token.get(WAIT)
        r = row(policy, "rep.ignored_timeout")
        assert (r["attempts"], r["timeouts"], r["ignored"]) == (1, 1, 0)
    finally:
        gate.set()
        c.stop()


def test_the_defaults_count_every_exception() -> None:
    policy = ReputationPolicy()
    assert (policy.ignore, policy.count_on) == ((), None)
    assert (policy.stats()["ignore"], policy.stats()["count_on"]) == ([], None)


# ---------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"auto_block": "yes"}, "auto_block must be True or False"),
        ({"block_threshold": 0}, "block_threshold must be a failure rate in (0, 1], got 0"),
        ({"block_threshold": 1.5}, "got 1.5"),
        ({"block_threshold": True}, "block_threshold"),
        ({"block_window": 0}, "block_window must be an integer from 1"),
        ({"block_window": 5, "block_min_attempts": 10}, "block_min_attempts must be an integer from 1 to 5, got 10"),
        ({"max_operations": 0}, "max_operations"),
        ({"reservoir_size": 2}, "reservoir_size must be an integer from 16"),
        ({"clock": 5}, "clock must be a callable returning seconds"),
        ({"ignore": "ValueError"}, "ignore must be an exception class or a tuple/list of them, got 'ValueError' "
                                   "(pass the class itself, not its name)"),
        ({"ignore": (ValueError, 3)}, "ignore must be an exception class or a tuple/list of them, got 3"),
        ({"ignore": int}, "got <class 'int'>"),
        ({"count_on": ()}, "count_on must name at least one exception class"),
        ({"count_on": [KeyError, None]}, "count_on must be an exception class or a tuple/list of them, got None"),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ReputationPolicy(**kwargs)
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# Lock-free recording of successes: folds must equal attempt-by-attempt counting


class _Ran:
    """The fields after_run and on_settle read from a token that ran (or timed out)."""

    def __init__(self, op: str, failed: bool, run_time: float | None, state: Any = None) -> None:
        self.operation_type = op
        self.is_error = failed
        self.outcome = Boom("x") if failed else "ok"
        self.started_at = None if run_time is None else 100.0
        self.finished_at = None if run_time is None else 100.0 + run_time
        self.run_time = run_time
        self.state = state


_EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.sampled_from(["a", "b"]), st.integers(1, 50)),
        st.tuples(st.just("fail"), st.sampled_from(["a", "b"]), st.integers(1, 50)),
        st.tuples(st.just("timeout"), st.sampled_from(["a", "b"]), st.just(0)),
        st.tuples(st.just("read"), st.just(""), st.just(0)),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(events=_EVENTS, window=st.integers(1, 8))
def test_folded_counts_equal_attempt_by_attempt_counting(events: list[tuple[str, str, int]], window: int) -> None:
    # Given a policy fed successes, failures and timeouts of two operations, read at random points
    policy = ReputationPolicy(block_window=window, block_min_attempts=1)
    model: dict[str, dict[str, Any]] = {}
    for kind, op, ms in events:
        if kind == "read":
            policy.stats()  # a fold from a reader
            continue
        m = model.setdefault(op, {"attempts": 0, "successes": 0, "failures": 0, "timeouts": 0,
                                  "window": collections.deque(maxlen=window), "min": None, "samples": []})
        m["attempts"] += 1
        if kind == "timeout":
            policy.on_settle(_Ran(op, True, None, TokenState.TIMEOUT))  # type: ignore[arg-type]
            m["timeouts"] += 1
            m["window"].append(True)
            continue
        run_time = ms / 1000
        policy.after_run(_Ran(op, kind == "fail", run_time))  # type: ignore[arg-type]
        m["successes" if kind == "ok" else "failures"] += 1
        m["window"].append(kind == "fail")
        m["samples"].append(run_time)
        m["min"] = run_time if m["min"] is None else min(m["min"], run_time)
    # Then every row is what counting each attempt in order gives
    for op, m in model.items():
        r = row(policy, op)
        assert (r["attempts"], r["successes"], r["failures"], r["timeouts"]) == (
            m["attempts"], m["successes"], m["failures"], m["timeouts"])
        assert r["recent_attempts"] == len(m["window"])
        expected_rate = sum(m["window"]) / len(m["window"])
        assert r["recent_failure_rate"] == pytest.approx(expected_rate)
        assert r["run_time"]["min"] == (None if m["min"] is None else pytest.approx(m["min"]))
        assert r["run_time"]["samples"] == min(len(m["samples"]), 100)


def test_successes_recorded_while_another_thread_reads_are_never_lost() -> None:
    # Given the loop-thread writer recording successes while a reader thread folds in a tight loop
    policy = ReputationPolicy()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            policy.stats()

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(20_000):
            policy.after_run(_Ran("a" if i % 3 else "b", False, 0.001))  # type: ignore[arg-type]
    finally:
        stop.set()
        t.join()
    # Then every attempt is counted once
    rows = {r["operation_type"]: r for r in policy.reputation()}
    assert rows["a"]["successes"] + rows["b"]["successes"] == 20_000
    assert rows["b"]["successes"] == len(range(0, 20_000, 3))


def _record_event(policy: ReputationPolicy, kind: str, op: str) -> None:
    """Feed one outcome of *op* to the policy as the coordinator would (loop thread)."""
    if kind == "ok":
        policy.after_run(_Ran(op, False, 0.001))  # type: ignore[arg-type]
    elif kind == "fail":
        policy.after_run(_Ran(op, True, 0.001))  # type: ignore[arg-type]
    elif kind == "timeout":
        policy.on_settle(_Ran(op, True, None, TokenState.TIMEOUT))  # type: ignore[arg-type]
    else:
        policy.on_settle(_Ran(op, True, None, TokenState.KILLED))  # type: ignore[arg-type]


@pytest.mark.parametrize("other", ["fail", "timeout", "kill"])
def test_an_operation_with_unfolded_successes_is_not_evicted_as_least_recently_seen(other: str) -> None:
    """Regression: a failure, timeout or kill was counted at once while the successes of other operations
    before it waited for a fold, so those operations looked older than they were: the LRU evicted one
    seen a moment ago (and lost its counts) and kept one seen long before."""
    # Given room for two operations, and `a` seen last just before `c` (b, then a, then c)
    policy = ReputationPolicy(max_operations=2)
    for kind, op in [("fail", "a"), ("ok", "a"), (other, "b"), ("ok", "a"), (other, "c")]:
        _record_event(policy, kind, op)
    # Then the least recently seen (b) is the one forgotten, and a keeps every attempt
    stats = policy.stats()
    assert [r["operation_type"] for r in policy.reputation()] == ["c", "a"]
    assert stats["evicted_operations"] == 1
    a = row(policy, "a")
    assert (a["attempts"], a["successes"], a["failures"]) == (3, 2, 1)


def test_a_fold_does_not_evict_an_operation_whose_successes_it_is_about_to_count() -> None:
    """Regression: a fold counted `c` (new) before `b`, whose last success came later, and creating `c`
    evicted `b`, the least recently seen row then: b's earlier success was lost with it, though b was
    seen just before and after c."""
    # Given room for two operations: b, then a, then b, c, b (those three still to fold)
    policy = ReputationPolicy(max_operations=2)
    for kind, op in [("ok", "b"), ("fail", "a"), ("ok", "b"), ("ok", "c"), ("ok", "b")]:
        _record_event(policy, kind, op)
    # When the policy is read (a fold)
    stats = policy.stats()
    # Then a, the least recently seen, is the one forgotten, and b keeps all three attempts
    assert [r["operation_type"] for r in policy.reputation()] == ["b", "c"]
    assert stats["evicted_operations"] == 1
    assert row(policy, "b")["attempts"] == 3


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["ok", "fail", "timeout", "kill", "read"]),
                                 st.sampled_from(["a", "b", "c"])), max_size=60))
def test_the_lru_order_equals_attempt_by_attempt_recording(events: list[tuple[str, str]]) -> None:
    # Given a policy with room for two of three operations, fed every outcome and read at random points
    policy = ReputationPolicy(max_operations=2)
    model: collections.OrderedDict[str, list[int]] = collections.OrderedDict()  # op -> [attempts, kills]
    evicted: set[str] = set()
    for kind, op in events:
        if kind == "read":
            policy.stats()
            continue
        _record_event(policy, kind, op)
        counts = model.pop(op, [0, 0])
        counts[1 if kind == "kill" else 0] += 1
        model[op] = counts
        if len(model) > 2:
            evicted.add(model.popitem(last=False)[0])
    # Then the tracked operations and their order are what recording each outcome in turn gives
    stats = policy.stats()
    assert [r["operation_type"] for r in policy.reputation()] == list(reversed(model))
    # and so are the counts of every operation never evicted (successes folded in one batch are
    # counted together, so one evicted between two of them may keep both: that is by design)
    rows = {op: [r["attempts"], r["kills"]] for op, r in stats["operations"].items()}
    assert {op: rows[op] for op in model if op not in evicted} == {op: c for op, c in model.items() if op not in evicted}
