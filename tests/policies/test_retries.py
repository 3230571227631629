"""Tests for tokengate.policies.retries: the original token gets the final outcome; bounded, jittered backoff."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tokengate import (
    OperationBlocked,
    OperationsCoordinator,
    Policy,
    TokenKilled,
    TokenState,
    task_token_guard,
)
from tokengate.errors import ConfigurationError
from tokengate.policies.reputation import ReputationPolicy
from tokengate.policies.retries import DEFAULT_BACKOFF, EXHAUSTED, Backoff, RetryPolicy, compute_backoff

WAIT = 5.0
NO_WAIT = {"retry_backoff": 0}  # base 0: every delay is exactly 0, so tests never sleep


class FixedRandom(random.Random):
    """uniform(a, b) always returns b: the longest delay the backoff allows."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Failing:
    """A callable that raises the given exceptions in turn, then returns the attempt number."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.raised: list[BaseException] = []

    def __call__(self) -> int:
        self.calls += 1
        if self.errors:
            exc = self.errors.pop(0)
            self.raised.append(exc)
            raise exc
        return self.calls


def guard(behaviour: Callable[[], int], op: str, **tags: Any) -> Any:
    @task_token_guard(operation_type=op, tags=tags)
    def f() -> int:
        return behaviour()

    return f


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


@pytest.fixture
def policy() -> RetryPolicy:
    return RetryPolicy(rng=random.Random(7))


@pytest.fixture
def coordinator(policy: RetryPolicy) -> Iterator[OperationsCoordinator]:
    c = OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy], stop_timeout=2.0).start()
    try:
        yield c
    finally:
        c.stop()


# ---------------------------------------------------------------------------
# The original token gets the final outcome


def test_failing_twice_then_succeeding_resolves_the_original_token() -> None:
    # Given a function that fails twice, then succeeds, with 3 retries (attached to this loop)
    behaviour = Failing(ValueError("one"), ValueError("two"))
    flaky = guard(behaviour, "retry.flaky", retries=3, **NO_WAIT)
    policy = RetryPolicy(rng=random.Random(1))

    async def main() -> tuple[int, int, Any]:
        async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy]):
            token = flaky()
            # When the caller awaits the token it got at once
            value = await token
            return value, token.attempt, token.state

    # Then the same token resolves with the value of the third attempt
    value, attempt, state = asyncio.run(main())
    assert (value, attempt, state) == (3, 3, TokenState.COMPLETED)
    assert behaviour.calls == 3
    stats = policy.stats()
    assert (stats["scheduled"], stats["succeeded_after_retry"], stats["exhausted"]) == (2, 1, 0)
    assert stats["operations"]["retry.flaky"]["scheduled"] == 2


def test_exhausted_retries_raise_the_last_exception_unchanged(
        coordinator: OperationsCoordinator, policy: RetryPolicy) -> None:
    # Given a function that always fails, with 2 retries
    behaviour = Failing(OSError("first"), OSError("second"), OSError("third"), OSError("never"))
    doomed = guard(behaviour, "retry.doomed", retries=2, **NO_WAIT)
    token = doomed()
    # When its retries run out
    with pytest.raises(OSError) as info:
        token.get(WAIT)
    # Then the awaiter gets the third (last) exception object itself, after exactly 3 runs
    assert info.value is behaviour.raised[-1]
    assert str(info.value) == "third"
    assert (behaviour.calls, token.attempt, token.state) == (3, 3, TokenState.FAILED)
    assert token.policy_data is not None and token.policy_data[EXHAUSTED] is True
    stats = policy.stats()
    assert (stats["scheduled"], stats["exhausted"], stats["succeeded_after_retry"]) == (2, 1, 0)


def test_success_on_first_attempt_is_not_a_retry(coordinator: OperationsCoordinator, policy: RetryPolicy) -> None:
    fine = guard(Failing(), "retry.fine", retries=3)
    token = fine()
    assert token.get(WAIT) == 1
    assert token.attempt == 1
    assert token.policy_data is None or EXHAUSTED not in token.policy_data
    assert policy.stats()["succeeded_after_retry"] == 0
    assert coordinator.stats()["counts"]["retries"] == 0


# ---------------------------------------------------------------------------
# retry_on


def test_exception_outside_retry_on_fails_at_once(coordinator: OperationsCoordinator, policy: RetryPolicy) -> None:
    behaviour = Failing(KeyError("no"), KeyError("never"))
    picky = guard(behaviour, "retry.picky", retries=3, retry_on=ValueError, **NO_WAIT)
    token = picky()
    with pytest.raises(KeyError):
        token.get(WAIT)
    assert (behaviour.calls, token.attempt) == (1, 1)
    assert policy.stats()["not_retryable"] == 1
    assert token.policy_data is None or EXHAUSTED not in token.policy_data


def test_retry_on_matches_subclasses_and_sequences(coordinator: OperationsCoordinator) -> None:
    behaviour = Failing(ConnectionResetError("reset"), TimeoutError("slow"))
    netty = guard(behaviour, "retry.net", retries=3, retry_on=[KeyError, OSError], **NO_WAIT)
    token = netty()
    assert token.get(WAIT) == 3
    assert token.attempt == 3


def test_switching_to_a_non_retryable_error_stops_retrying(coordinator: OperationsCoordinator) -> None:
    behaviour = Failing(ValueError("retry me"), TypeError("do not"))
    mixed = guard(behaviour, "retry.mixed", retries=5, retry_on=ValueError, **NO_WAIT)
    with pytest.raises(TypeError, match="do not"):
        mixed().get(WAIT)
    assert behaviour.calls == 2


def test_functions_without_retries_are_not_retried(coordinator: OperationsCoordinator, policy: RetryPolicy) -> None:
    behaviour = Failing(ValueError("once"))
    plain = guard(behaviour, "retry.plain")
    zero = guard(Failing(ValueError("once")), "retry.zero", retries=0)
    assert policy.interested(plain) is False and policy.interested(zero) is False
    with pytest.raises(ValueError):
        plain().get(WAIT)
    assert behaviour.calls == 1
    assert policy.stats()["scheduled"] == 0


# ---------------------------------------------------------------------------
# Retries go back through admission


def test_a_retry_of_a_blocked_operation_is_refused() -> None:
    # Given reputation auto-blocks at the first failure, and the function has retries
    reputation = ReputationPolicy(auto_block=True, block_threshold=1.0, block_window=1, block_min_attempts=1)
    retries = RetryPolicy(rng=random.Random(3))
    behaviour = Failing(ValueError("boom"))
    blocked = guard(behaviour, "retry.blocked", retries=3, **NO_WAIT)
    c = OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[reputation, retries]).start()
    try:
        token = blocked()
        # When the first attempt fails (blocking the operation) and the retry comes back to admission
        with pytest.raises(OperationBlocked) as info:
            token.get(WAIT)
        # Then the retry is refused, and the ORIGINAL awaiter learns why
        assert info.value.operation_type == "retry.blocked"
        assert (behaviour.calls, token.attempt, token.state) == (1, 2, TokenState.REJECTED)
        assert retries.stats()["ended_in_retry"] == 1
    finally:
        c.stop()


def test_a_token_killed_during_backoff_never_runs_again() -> None:
    # Given a long backoff (the fixed rng always picks the cap)
    policy = RetryPolicy(rng=FixedRandom())
    behaviour = Failing(ValueError("boom"))
    slow_retry = guard(behaviour, "retry.killed", retries=3, retry_backoff={"base": 60, "cap": 60})
    c = OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy]).start()
    try:
        token = slow_retry()
        wait_until(lambda: token.attempt == 2 and token.state is TokenState.WAITING)
        # When it is killed while waiting for its retry
        assert c.kill(token.token_id).killed
        # Then its awaiter gets TokenKilled and the function never runs again
        with pytest.raises(TokenKilled):
            token.get(WAIT)
        assert behaviour.calls == 1
        assert policy.stats()["ended_in_retry"] == 1
        # and the 60 s backoff timer no longer keeps the settled token alive
        ref = weakref.ref(token)
        del token
        gc.collect()
        assert ref() is None
    finally:
        c.stop()


class StopAfterFirstAttempt(Policy):
    """Starts the coordinator's graceful stop from the first after_run, so a retry meets the stop."""

    name = "stop_after_first_attempt"

    def __init__(self) -> None:
        self.coordinator: OperationsCoordinator | None = None
        self.closing: asyncio.Task[None] | None = None

    def on_start(self, coordinator: OperationsCoordinator) -> None:
        self.coordinator = coordinator

    def after_run(self, token: Any) -> float | None:
        if self.closing is None and self.coordinator is not None:
            self.closing = asyncio.ensure_future(self.coordinator.aclose())
        return None


def test_a_retry_whose_backoff_ends_while_stopping_still_runs() -> None:
    # Given a retry scheduled just before stop() begins (a policy starts the
    # stop from after_run, so the stop is under way when the backoff ends)
    behaviour = Failing(ValueError("boom"))
    flaky = guard(behaviour, "retry.stopping", retries=3, **NO_WAIT)
    stopper = StopAfterFirstAttempt()
    c = OperationsCoordinator(num_cores=1, workers_per_core=2, stop_timeout=2.0,
                              policies=[stopper, RetryPolicy(rng=random.Random(1))])

    async def main() -> tuple[int, int, TokenState]:
        await c.astart()
        token = flaky()
        # When the retry comes back to admission during the graceful stop
        value = await token
        assert stopper.closing is not None
        await stopper.closing
        return value, token.attempt, token.state

    # Then it runs (accepted work finishes) instead of waiting out stop_timeout
    # and settling as CoordinatorStopped
    assert asyncio.run(main()) == (2, 2, TokenState.COMPLETED)
    assert behaviour.calls == 2


def test_a_retry_refused_by_the_stop_is_not_counted_as_scheduled() -> None:
    # Given a call whose first retry runs while the coordinator is stopping
    behaviour = Failing(ValueError("first"), ValueError("second"))
    flaky = guard(behaviour, "retry.stopped", retries=3, **NO_WAIT)
    retries = RetryPolicy(rng=random.Random(1))
    stopper = StopAfterFirstAttempt()
    c = OperationsCoordinator(num_cores=1, workers_per_core=2, stop_timeout=2.0,
                              policies=[stopper, retries])

    async def main() -> tuple[BaseException | None, int, TokenState]:
        await c.astart()
        token = flaky()
        try:
            await token
        except ValueError as exc:
            error: BaseException | None = exc
        else:
            error = None
        assert stopper.closing is not None
        await stopper.closing
        return error, token.attempt, token.state

    # When that retry fails too: the stop schedules no further attempt
    error, attempt, state = asyncio.run(main())
    assert (str(error), attempt, state, behaviour.calls) == ("second", 2, TokenState.FAILED, 2)
    # Then the statistics count only the retry that really ran
    stats = retries.stats()
    assert (stats["scheduled"], stats["exhausted"]) == (1, 0)
    assert stats["operations"]["retry.stopped"]["scheduled"] == 1


# ---------------------------------------------------------------------------
# after_run decisions (no coordinator)


class StubToken:
    def __init__(self, attempt: int, error: BaseException | None, **tags: Any) -> None:
        self.attempt = attempt
        self.is_error = error is not None
        self.outcome = error
        self.tags = tags
        self.policy_data: dict[str, Any] | None = None
        self.operation_type = "stub"


def test_after_run_returns_the_backoff_delay() -> None:
    policy = RetryPolicy(rng=random.Random(42))
    reference = random.Random(42)
    backoff = Backoff(0.5, 3.0)
    after_run: Any = policy.after_run
    for attempt in (1, 2, 3, 4, 5):
        token = StubToken(attempt, ValueError("x"), retries=5, retry_backoff=backoff)
        expected = reference.uniform(0, min(3.0, 0.5 * 2 ** (attempt - 1)))
        assert after_run(token) == expected
    # Attempt 6 of retries=5: exhausted, no delay
    last = StubToken(6, ValueError("x"), retries=5)
    assert after_run(last) is None
    assert last.policy_data == {EXHAUSTED: True}


def test_after_run_uses_default_backoff() -> None:
    policy = RetryPolicy(rng=FixedRandom())
    after_run: Any = policy.after_run
    assert after_run(StubToken(1, ValueError("x"), retries=1)) == DEFAULT_BACKOFF.base
    assert after_run(StubToken(1, KeyboardInterrupt(), retries=1)) is None  # not an Exception: never retried


# ---------------------------------------------------------------------------
# compute_backoff (pure)


def test_compute_backoff_is_bounded_by_the_exponential_ceiling_and_the_cap() -> None:
    rng = random.Random(2024)
    base, cap = 0.1, 2.0
    for attempt in range(1, 40):
        ceiling = min(cap, base * 2 ** (attempt - 1))
        for _ in range(50):
            delay = compute_backoff(attempt, base, cap, rng)
            assert 0.0 <= delay <= ceiling


def test_compute_backoff_is_reproducible_with_a_seed() -> None:
    first = [compute_backoff(a, 0.05, 5.0, random.Random(9)) for a in range(1, 10)]
    second = [compute_backoff(a, 0.05, 5.0, random.Random(9)) for a in range(1, 10)]
    assert first == second
    reference = random.Random(9)
    assert compute_backoff(3, 0.05, 5.0, random.Random(9)) == reference.uniform(0, 0.2)


def test_compute_backoff_reaches_the_ceiling_with_full_jitter() -> None:
    # Full jitter: the delay spans the whole [0, ceiling] range (the fixed rng picks the top)
    assert compute_backoff(1, 0.05, 5.0, FixedRandom()) == 0.05
    assert compute_backoff(4, 0.05, 5.0, FixedRandom()) == 0.4
    assert compute_backoff(100, 0.05, 5.0, FixedRandom()) == 5.0
    assert compute_backoff(10_000, 0.05, 5.0, FixedRandom()) == 5.0  # no overflow for huge attempts
    assert compute_backoff(7, 0.0, 5.0, FixedRandom()) == 0.0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((0, 0.1, 1.0), "attempt must be an integer >= 1, got 0"),
        ((True, 0.1, 1.0), "attempt must be an integer"),
        ((1, -0.1, 1.0), "base must be a finite number of seconds >= 0, got -0.1"),
        ((1, 0.1, float("inf")), "cap must be a finite number"),
        ((1, float("nan"), 1.0), "base must be a finite number"),
    ],
)
def test_compute_backoff_rejects_bad_input(args: tuple[Any, Any, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        compute_backoff(args[0], args[1], args[2], random.Random(0))
    assert fragment in str(info.value)


# ---------------------------------------------------------------------------
# Tags and configuration


def test_tags_are_normalized() -> None:
    a = guard(Failing(), "retry.norm_a", retries=2, retry_backoff=0.2, retry_on=[ValueError, KeyError])
    assert a.tags["retries"] == 2
    assert a.tags["retry_backoff"] == Backoff(0.2, 5.0)
    assert a.tags["retry_on"] == (ValueError, KeyError)
    b = guard(Failing(), "retry.norm_b", retries=1, retry_backoff={"cap": 1}, retry_on=OSError)
    assert b.tags["retry_backoff"] == Backoff(0.05, 1.0)
    assert b.tags["retry_on"] == (OSError,)
    c = guard(Failing(), "retry.norm_c", retries=1, retry_backoff=30)
    assert c.tags["retry_backoff"] == Backoff(30.0, 30.0)  # the cap never sits below the base


@pytest.mark.parametrize(
    ("tags", "fragment"),
    [
        ({"retries": -1}, "tag 'retries': retries must be from 0 to 100, got -1"),
        ({"retries": 101}, "got 101"),
        ({"retries": True}, "retries must be an integer"),
        ({"retries": "3"}, "retries must be an integer"),
        ({"retries": 1, "retry_backoff": "fast"}, "tag 'retry_backoff': retry_backoff base must be a number"),
        ({"retries": 1, "retry_backoff": -1}, "must be from 0 to 3600 seconds, got -1"),
        ({"retries": 1, "retry_backoff": float("nan")}, "got nan"),
        ({"retries": 1, "retry_backoff": {"base": 2, "cap": 1}}, "cap (1s) must be >= base (2s)"),
        ({"retries": 1, "retry_backoff": {"bse": 1}}, "accepts the keys 'base' and 'cap', got unknown ['bse']"),
        ({"retries": 1, "retry_on": "ValueError"}, "tag 'retry_on': retry_on must be an Exception subclass"),
        ({"retries": 1, "retry_on": KeyboardInterrupt}, "KeyboardInterrupt are never retried"),
        ({"retries": 1, "retry_on": []}, "at least one exception class"),
        ({"retries": 1, "retry_on": (ValueError, 3)}, "got 3"),
        ({"retrys": 1}, "did you mean 'retries'"),
    ],
)
def test_bad_tags_fail_at_decoration(tags: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        guard(Failing(), "retry.bad", **tags)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rng": 42}, "rng must be a random.Random, got int 42"),
        ({"max_operations": 0}, "max_operations must be a positive integer"),
    ],
)
def test_bad_configuration_is_rejected(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**kwargs)
    assert fragment in str(info.value)


def test_backoff_tags_without_retries_log_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    lonely = guard(Failing(), "retry.lonely", retry_backoff=1.0)
    with caplog.at_level("WARNING", logger="tokengate.policies.retries"):
        assert RetryPolicy().interested(lonely) is False
    assert "retry.lonely" in caplog.text and "no retries" in caplog.text


def test_stats_are_json_ready(coordinator: OperationsCoordinator, policy: RetryPolicy) -> None:
    flaky = guard(Failing(ValueError("x")), "retry.stats", retries=1, **NO_WAIT)
    assert flaky().get(WAIT) == 2
    stats = policy.stats()
    assert json.loads(json.dumps(stats)) == stats
    assert stats["operations"]["retry.stats"] == {
        "scheduled": 1, "succeeded_after_retry": 1, "exhausted": 0, "not_retryable": 0, "ended_in_retry": 0}
    assert coordinator.stats()["policies"]["retries"]["scheduled"] == 1
    assert coordinator.stats()["counts"]["retries"] == 1
