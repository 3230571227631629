"""Tests for tokengate.policies.quarantine: triggers, persistence, release and discard, containment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    OperationBlocked,
    OperationsCoordinator,
    Policy,
    TaskToken,
    TokenQuarantined,
    TokenState,
    task_token_guard,
)
from tokengate.policies.quarantine import QuarantinePolicy, footprint
from tokengate.policies.retries import RetryPolicy  # also declares the retries tags used below
from tokengate.quarantine.store import DEFAULT_PATH, QuarantineStateError, QuarantineStore, QuarantineStoreError

# -- decorated functions (module level, so a release can find them again) --------------


@task_token_guard(operation_type="q.add")
def add(a: Any, b: Any) -> Any:
    return a + b


@task_token_guard(operation_type="q.size")
def size_of(data: bytes) -> int:
    return len(data)


@task_token_guard(operation_type="q.negative")
def reject_negative(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative {x}")
    return x


_FLAKY = {"fail": True}


@task_token_guard(operation_type="q.flaky")
def flaky(x: int) -> int:
    if _FLAKY["fail"]:
        raise RuntimeError("flaky failure")
    return x


@task_token_guard(operation_type="q.retried", tags={"retries": 2, "retry_backoff": {"base": 0.0, "cap": 0.0}})
def always_fails(x: int) -> int:
    raise ConnectionError(f"unreachable {x}")


_GATE = threading.Event()


@task_token_guard(operation_type="q.gated")
def gated(x: int) -> int:
    _GATE.wait(30)
    return x


# -- helpers ------------------------------------------------------------------------------


class Spy(Policy):
    """Records the terminal state of every token it sees settle."""

    name = "spy"

    def __init__(self) -> None:
        self.settled: list[tuple[str, TokenState]] = []

    def on_settle(self, token: TaskToken[Any]) -> None:
        self.settled.append((token.operation_type, token.state))


class RetryAlways(Policy):
    """Retries every failed attempt at once (stands in for the retries policy)."""

    name = "retry_always"

    def after_run(self, token: TaskToken[Any]) -> float | None:
        return 0.0 if token._is_error and token.attempt < 10 else None


class MarkExhausted(Policy):
    """Marks every failure as 'retries exhausted', as the retries policy does on its last attempt."""

    name = "mark_exhausted"

    def after_run(self, token: TaskToken[Any]) -> float | None:
        if token._is_error:
            if token.policy_data is None:
                token.policy_data = {}
            token.policy_data["retries_exhausted"] = True
        return None


class RefuseReleased(Policy):
    """Refuses every call whose token was marked as a quarantine release."""

    name = "refuse_released"

    def before_submit(self, token: TaskToken[Any]) -> None:
        if token.policy_data and "quarantine.release_id" in token.policy_data:
            raise OperationBlocked("blocked for the test", operation_type=token.operation_type)


class FailingStore(QuarantineStore):
    def insert(self, *args: Any, **kwargs: Any) -> Any:
        raise QuarantineStoreError("quarantine store: add failed: disk I/O error")


def settle(token: TaskToken[Any]) -> None:
    """Wait, on the token's own loop, until its future is resolved, and mark any error retrieved.

    ``token.get()`` may return as soon as the coordinator *starts* finalizing the
    token, before the ``on_settle`` hooks ran (where a release's outcome is
    stored) and before the asyncio future is resolved. The future is resolved
    after every hook, so waiting for it makes the checks that follow
    deterministic. Retrieving the error keeps the future's finalizer from
    logging "exception was never retrieved" at GC time (on CPython 3.11 that
    log can run inside another ``ast.parse`` and break it).
    """

    async def resolved() -> None:
        await asyncio.wait([token])
        if not token.cancelled():
            token.exception()

    asyncio.run_coroutine_threadsafe(resolved(), token.get_loop()).result(timeout=10)


def fails(token: TaskToken[Any], exc: type[BaseException], match: str | None = None) -> pytest.ExceptionInfo[Any]:
    """Assert that *token* settles with *exc* (see :func:`settle`)."""
    with pytest.raises(exc, match=match) as info:
        token.get(timeout=10)
    settle(token)
    return info


@contextmanager
def running(*policies: Policy, workers: int = 2) -> Iterator[OperationsCoordinator]:
    coordinator = OperationsCoordinator(num_cores=1, workers_per_core=workers, policies=list(policies),
                                        name="qtest")
    coordinator.start()
    try:
        yield coordinator
    finally:
        coordinator.stop(timeout=10)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "quarantine.sqlite3")


@pytest.fixture(autouse=True)
def _reset_module_state() -> Iterator[None]:
    _FLAKY["fail"] = True
    _GATE.clear()
    yield
    _GATE.set()  # never leave a worker parked in gated()


# -- (c) held operation ------------------------------------------------------------------------


def test_held_operation_is_quarantined_persisted_and_settles_as_quarantined(db: str) -> None:
    # Given a coordinator with quarantine and an operation on hold
    spy = Spy()
    policy = QuarantinePolicy(db)
    with running(policy, spy):
        policy.hold("q.add")
        assert policy.held_operations() == ["q.add"]

        # When the held operation is called
        with pytest.raises(TokenQuarantined) as info:
            add(2, 3)

        # Then the refusal carries the record id and trigger, the record is pending,
        # and the token settled as QUARANTINED
        exc = info.value
        assert exc.trigger == "held_operation" and exc.operation_type == "q.add"
        record = policy.get(exc.quarantine_id)
        assert record is not None
        assert record["status"] == "pending" and record["trigger"] == "held_operation"
        assert record["func_qualname"] == "add" and record["has_payload"]
        assert record["args_summary"] == "0: int 2, 1: int 3"
        assert ("q.add", TokenState.QUARANTINED) in spy.settled

        # And other operations are not affected; unhold admits the operation again
        assert size_of(b"abc").get(timeout=10) == 3
        policy.unhold("q.add")
        assert add(2, 3).get(timeout=10) == 5
        assert policy.held_operations() == []
        stats = policy.stats()
        assert stats["quarantined_by_trigger"] == {"argument_spike": 0, "poison_call": 0, "held_operation": 1}
        assert stats["records_by_status"] == {"pending": 1, "released": 0, "discarded": 0}


def test_hold_rejects_a_bad_operation_type() -> None:
    policy = QuarantinePolicy(":memory:")
    with pytest.raises(ConfigurationError, match="non-empty string"):
        policy.hold("")


# -- (a) argument-size spike --------------------------------------------------------------------


def test_argument_spike_is_quarantined_once_enough_samples_exist(db: str) -> None:
    # Given 20 accepted calls of about 10 kB each
    policy = QuarantinePolicy(db, spike_min_samples=20)
    with running(policy):
        for _ in range(20):
            assert size_of(bytes(10_000)).get(timeout=10) == 10_000

        # When a call is ~10x the recent p99 (and above the 64 KiB floor)
        with pytest.raises(TokenQuarantined) as info:
            size_of(bytes(100_000))

        # Then it is quarantined as a spike; a call at ~7x the p99 is not a spike
        assert info.value.trigger == "argument_spike"
        record = policy.get(info.value.quarantine_id)
        assert record is not None and "exceeds 8 x the recent p99" in record["reason"]
        assert size_of(bytes(70_000)).get(timeout=10) == 70_000


def test_no_spike_is_judged_before_min_samples(db: str) -> None:
    # Given only 19 of the 20 samples needed
    policy = QuarantinePolicy(db, spike_min_samples=20)
    with running(policy):
        for _ in range(19):
            size_of(bytes(10_000)).get(timeout=10)
        # When / Then a huge call is still admitted
        assert size_of(bytes(1_000_000)).get(timeout=10) == 1_000_000
        assert policy.stats()["quarantined_by_trigger"]["argument_spike"] == 0


def test_small_calls_are_never_spikes_below_the_floor(db: str) -> None:
    # Given tiny typical calls (p99 ~ 40 bytes)
    policy = QuarantinePolicy(db, spike_min_samples=10)
    with running(policy):
        for _ in range(10):
            size_of(bytes(5)).get(timeout=10)
        # When a call is 100x bigger but still under spike_min_bytes, it is admitted
        assert size_of(bytes(4_000)).get(timeout=10) == 4_000
        # And with the floor at 0 the same jump is a spike
    strict = QuarantinePolicy(":memory:", spike_min_samples=10, spike_min_bytes=0)
    with running(strict):
        for _ in range(10):
            size_of(bytes(5)).get(timeout=10)
        with pytest.raises(TokenQuarantined):
            size_of(bytes(4_000))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_of_tiny_calls_cannot_drag_the_spike_limit_down_quickly(db: str) -> None:
    # Given an operation whose ordinary calls are ~100 kB, and a baseline half-life of 600 s
    clock = FakeClock()
    policy = QuarantinePolicy(":memory:", spike_min_samples=32, spike_window=64, spike_min_bytes=64 * 1024,
                              spike_baseline_half_life=600.0, clock=clock)

    def flood(n: int) -> None:  # tiny calls at 1,000 per second
        for _ in range(n):
            clock.now += 0.001
            size_of(b"x").get(timeout=10)

    with running(policy):
        for _ in range(64):
            assert size_of(bytes(100_000)).get(timeout=10) == 100_000
        # When an attacker floods it with 1,000 tiny calls (the window holds only those now)
        flood(1000)
        # Then an ordinary call is still admitted: the limit did not fall with the window's p99
        assert size_of(bytes(100_000)).get(timeout=10) == 100_000
        # And after two half-lives of flood, still: the limit is 8 x 100 kB / 4 = 200 kB
        flood(64)  # the admitted call leaves the window
        clock.now += 1200
        flood(64)
        assert size_of(bytes(150_000)).get(timeout=10) == 150_000
        # But after log2(8) = 3 half-lives past that call, the limit reaches the floor: a 100 kB call is a spike
        flood(64)
        clock.now += 5 * 600  # 150 kB x 8 / 2^5 < 64 KiB
        flood(64)
        with pytest.raises(TokenQuarantined):
            size_of(bytes(100_000))
        assert policy.stats()["quarantined_by_trigger"]["argument_spike"] == 1


def test_without_decay_the_same_flood_would_quarantine_ordinary_calls_at_once() -> None:
    # The contrast that shows the bound matters: a baseline that follows the window's p99 at once
    clock = FakeClock()
    policy = QuarantinePolicy(":memory:", spike_min_samples=32, spike_window=64, spike_min_bytes=64 * 1024,
                              spike_baseline_half_life=1e-9, clock=clock)
    with running(policy):
        for _ in range(64):
            size_of(bytes(100_000)).get(timeout=10)
        for _ in range(128):
            clock.now += 0.001
            size_of(b"x").get(timeout=10)
        with pytest.raises(TokenQuarantined):
            size_of(bytes(100_000))


def test_footprint_is_a_cheap_estimate_that_scales_with_containers() -> None:
    small = footprint((1, 2), {})
    assert 0 < small < 200
    # A container is measured by sampling: length x mean item size, never walked
    assert footprint(([b"x" * 1000] * 10_000,), {}) > 10_000_000
    assert footprint((), {"d": {i: "v" * 100 for i in range(1000)}}) > 100_000
    assert footprint((bytes(50_000),), {}) > footprint((bytes(5_000),), {}) > 5_000


def test_footprint_never_raises_on_broken_objects() -> None:
    class Broken(list[int]):
        def __len__(self) -> int:
            raise RuntimeError("no len")

    class BadSize:
        def __sizeof__(self) -> int:
            raise RuntimeError("no size")

    assert footprint((Broken([1]), BadSize()), {}) > 0


def test_footprint_uses_nbytes_of_array_views() -> None:
    np = pytest.importorskip("numpy")
    base = np.zeros(1_000_000, dtype=np.uint8)
    view = base[:]
    assert footprint((view,), {}) >= 1_000_000


# -- (b) poison calls ---------------------------------------------------------------------------


def test_a_call_that_failed_n_times_is_quarantined_next_time(db: str) -> None:
    # Given an identical call that failed poison_failures=3 times
    policy = QuarantinePolicy(db)
    with running(policy):
        for _ in range(3):
            fails(reject_negative(-1), ValueError, match="negative -1")

        # When it is made again, then it is quarantined as poison
        with pytest.raises(TokenQuarantined) as info:
            reject_negative(-1)
        assert info.value.trigger == "poison_call"
        record = policy.get(info.value.quarantine_id)
        assert record is not None and "failed 3 times in a row" in record["reason"]

        # And a different argument, or the same one under another operation, still runs
        fails(reject_negative(-2), ValueError, match="negative -2")
        assert reject_negative(5).get(timeout=10) == 5
        assert add(-1, 0).get(timeout=10) == -1


def test_two_failures_are_not_poison_and_a_success_clears_the_count(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy):
        # Given two failures of flaky(7)
        for _ in range(2):
            fails(flaky(7), RuntimeError)
        # When it then succeeds
        _FLAKY["fail"] = False
        assert flaky(7).get(timeout=10) == 7
        # Then two more failures are again not enough to quarantine it
        _FLAKY["fail"] = True
        for _ in range(2):
            fails(flaky(7), RuntimeError)
        fails(flaky(7), RuntimeError)  # the third failure in a row is still admitted
        with pytest.raises(TokenQuarantined):
            flaky(7)


def test_ignored_exception_types_never_make_a_call_poison(db: str) -> None:
    # Given ValueError declared an expected outcome
    policy = QuarantinePolicy(db, poison_failures=1, poison_ignore=[ValueError])
    with running(policy):
        for _ in range(3):
            fails(reject_negative(-5), ValueError)
        # Then the call keeps running (and raising its own error), while other errors still count
        fails(reject_negative(-5), ValueError)
        fails(flaky(1), RuntimeError)
        with pytest.raises(TokenQuarantined):
            flaky(1)


def test_exhausted_retries_make_the_next_identical_call_poison(db: str) -> None:
    # Given a policy that marks a failure as "retries exhausted"
    policy = QuarantinePolicy(db)
    with running(policy, MarkExhausted()):
        fails(reject_negative(-3), ValueError)
        # When / Then the very next identical call is quarantined
        with pytest.raises(TokenQuarantined) as info:
            reject_negative(-3)
        record = policy.get(info.value.quarantine_id)
        assert record is not None and "exhausted its retries" in record["reason"]


def test_with_the_retries_policy_an_exhausted_call_is_poison_next_time(db: str) -> None:
    # Given the real retries policy (2 retries) and a call that always fails
    policy = QuarantinePolicy(db, poison_failures=10)
    with running(policy, RetryPolicy()):
        token = always_fails(1)
        fails(token, ConnectionError)
        assert token.attempt == 3
        # When / Then the next identical call is quarantined, a different one is not
        with pytest.raises(TokenQuarantined) as info:
            always_fails(1)
        assert "exhausted its retries" in policy.get(info.value.quarantine_id)["reason"]  # type: ignore[index]
        fails(always_fails(2), ConnectionError)


def test_a_retry_of_a_poisoned_call_settles_the_original_token_as_quarantined(db: str) -> None:
    # Given retries on every failure and poison after 2 failures
    policy = QuarantinePolicy(db, poison_failures=2)
    spy = Spy()
    with running(policy, RetryAlways(), spy):
        token = reject_negative(-4)
        # When the third attempt is re-admitted, then the awaiter gets TokenQuarantined
        info = fails(token, TokenQuarantined)
        assert info.value.trigger == "poison_call"
        assert token.state is TokenState.QUARANTINED and token.attempt == 3
        assert policy.get(info.value.quarantine_id) is not None


def test_the_failure_memory_is_a_bounded_lru(db: str) -> None:
    # Given room for two fingerprints and poison after one failure
    policy = QuarantinePolicy(db, poison_failures=1, poison_capacity=2)
    with running(policy):
        for x in (-1, -2, -3):
            fails(reject_negative(x), ValueError)
        assert policy.stats()["poison_fingerprints"] == 2
        # Then the oldest (-1) was forgotten and runs again; the newest is still poison
        fails(reject_negative(-1), ValueError)
        with pytest.raises(TokenQuarantined):
            reject_negative(-3)


# -- release, discard, persistence ---------------------------------------------------------------


def test_records_survive_a_coordinator_restart_and_release_runs_the_call(db: str) -> None:
    # Given a call quarantined by coordinator A
    first = QuarantinePolicy(db)
    with running(first):
        first.hold("q.add")
        with pytest.raises(TokenQuarantined) as info:
            add(20, 22)
    qid = info.value.quarantine_id

    # When coordinator B opens the same file with a new policy
    second = QuarantinePolicy(db)
    with running(second):
        pending = second.list(status="pending")
        assert [r["id"] for r in pending] == [qid]

        # Then releasing it runs the function and stores the outcome
        token = second.release(qid)
        assert token.get(timeout=10) == 42
        settle(token)
        assert second.flush()  # the outcome is stored by the writer thread
        record = second.get(qid)
        assert record is not None
        assert record["status"] == "released" and record["outcome_ok"] is True
        assert record["outcome_summary"] == "completed: returned 42"
        assert second.stats()["releases_in_flight"] == 0

        # And a second release is refused
        with pytest.raises(QuarantineStateError, match="released, not pending"):
            second.release(qid)


def test_release_works_in_a_fresh_process(db: str) -> None:
    # Given a call quarantined in this process
    policy = QuarantinePolicy(db)
    with running(policy):
        policy.hold("q.add")
        with pytest.raises(TokenQuarantined) as info:
            add(1, 2)
    qid = info.value.quarantine_id

    # When a new interpreter, which has never imported this module, releases it
    depth = len(__name__.split("."))
    import_root = Path(__file__).resolve().parents[depth - 1]
    script = (
        "import json, sys\n"
        "from tokengate import OperationsCoordinator\n"
        "from tokengate.policies.quarantine import QuarantinePolicy\n"
        "p = QuarantinePolicy(sys.argv[1])\n"
        "with OperationsCoordinator(num_cores=1, workers_per_core=1, policies=[p]):\n"
        "    result = p.release(sys.argv[2]).get(timeout=30)\n"
        "print(json.dumps({'result': result, 'record': p.get(sys.argv[2])}))  # after stop: every hook ran\n"
        "p.close()\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(import_root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, db, qid], capture_output=True, text=True, env=env,
                          timeout=60, check=False)

    # Then the function was imported and run there, and the record holds the outcome
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["result"] == 3
    assert out["record"]["status"] == "released" and out["record"]["outcome_summary"] == "completed: returned 3"


def test_a_released_call_that_fails_is_recorded_as_failed(db: str) -> None:
    policy = QuarantinePolicy(db, poison_failures=1)
    with running(policy):
        fails(reject_negative(-9), ValueError)
        with pytest.raises(TokenQuarantined) as info:
            reject_negative(-9)
        # When the poison call is released, it runs (not quarantined again) and fails
        token = policy.release(info.value.quarantine_id)
        fails(token, ValueError, match="negative -9")
        assert policy.flush()
        record = policy.get(info.value.quarantine_id)
        assert record is not None and record["status"] == "released" and record["outcome_ok"] is False
        assert record["outcome_summary"] == "failed: ValueError: negative -9"


def test_release_while_in_flight_is_refused_and_discard_too(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy):
        policy.hold("q.gated")
        with pytest.raises(TokenQuarantined) as info:
            gated(1)
        qid = info.value.quarantine_id
        token = policy.release(qid)  # blocks in gated() until _GATE is set
        with pytest.raises(QuarantineStateError, match="already being released"):
            policy.release(qid)
        with pytest.raises(QuarantineStateError, match="being released"):
            policy.discard(qid)
        _GATE.set()
        assert token.get(timeout=10) == 1
        settle(token)
        assert policy.flush()  # the outcome is stored by the writer thread
        assert policy.get(qid)["status"] == "released"  # type: ignore[index]


def test_discard_then_release_and_discard_again_are_refused(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy):
        policy.hold("q.add")
        with pytest.raises(TokenQuarantined) as info:
            add(1, 1)
        qid = info.value.quarantine_id
        record = policy.discard(qid)
        assert record["status"] == "discarded"
        assert policy.list(status="discarded")[0]["id"] == qid
        with pytest.raises(QuarantineStateError, match="discarded, not pending"):
            policy.release(qid)
        with pytest.raises(QuarantineStateError):
            policy.discard(qid)


def test_unknown_ids(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy):
        assert policy.get("nope") is None
        with pytest.raises(KeyError):
            policy.release("nope")
        with pytest.raises(KeyError):
            policy.discard("nope")


def test_unpicklable_arguments_are_recorded_but_cannot_be_replayed(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy):
        policy.hold("q.add")
        # When the held call's arguments cannot be pickled
        with pytest.raises(TokenQuarantined) as info:
            add(threading.Lock(), 1)
        # Then the record exists without a payload, and release says why it cannot replay
        record = policy.get(info.value.quarantine_id)
        assert record is not None and not record["has_payload"] and "pickle" in record["payload_error"]
        with pytest.raises(QuarantineStateError, match="cannot be replayed: its arguments were not stored"):
            policy.release(info.value.quarantine_id)
        assert policy.get(info.value.quarantine_id)["status"] == "pending"  # type: ignore[index]


def test_release_of_a_function_that_cannot_be_found(db: str) -> None:
    store = QuarantineStore(db)
    try:
        rec = store.add("ghost", "no_such_module_for_tokengate_tests", "f", "held_operation", "test", (1,), {})
        policy = QuarantinePolicy(store)
        with running(policy):
            with pytest.raises(QuarantineStateError, match="cannot import module"):
                policy.release(rec.id)
    finally:
        store.close()


def test_release_refused_by_another_policy_stays_pending(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy, RefuseReleased()):
        policy.hold("q.add")
        with pytest.raises(TokenQuarantined) as info:
            add(1, 1)
        with pytest.raises(OperationBlocked):
            policy.release(info.value.quarantine_id)
        record = policy.get(info.value.quarantine_id)
        assert record is not None and record["status"] == "pending"
        assert record["claimed_by"] is None  # the claim ended: any process may release it again
        assert policy.stats()["releases_in_flight"] == 0


def test_a_release_killed_before_it_ran_ends_its_claim(db: str) -> None:
    # Given a release submitted while the coordinator is paused
    policy = QuarantinePolicy(db)
    with running(policy) as coordinator:
        policy.hold("q.add")
        with pytest.raises(TokenQuarantined) as info:
            add(1, 1)
        qid = info.value.quarantine_id
        coordinator.pause()
        token = policy.release(qid)
        assert policy.get(qid)["claimed_by"] is not None  # type: ignore[index]

        # When it is killed before a worker took it
        token.kill()
        settle(token)
        assert policy.flush()  # the outcome is stored by the writer thread

        # Then the record is pending and unclaimed, and can be released again
        record = policy.get(qid)
        assert record is not None and record["status"] == "pending" and record["claimed_by"] is None
        coordinator.resume()
        again = policy.release(qid)
        assert again.get(timeout=10) == 2
        settle(again)
        assert policy.flush()  # the outcome is stored by the writer thread
        assert policy.get(qid)["status"] == "released"  # type: ignore[index]


def test_a_release_claimed_by_another_live_process_is_refused_unless_forced(db: str, tmp_path: Path) -> None:
    # Given a pending record that another running process has claimed in the shared file
    import sqlite3

    import psutil

    from tokengate.quarantine.store import _HOST

    policy = QuarantinePolicy(db)
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with running(policy):
            policy.hold("q.add")
            with pytest.raises(TokenQuarantined) as info:
                add(2, 3)
            qid = info.value.quarantine_id
            owner = f"{_HOST}:{other.pid}:{psutil.Process(other.pid).create_time():.2f}"
            with contextlib.closing(sqlite3.connect(db)) as conn, conn:
                conn.execute("UPDATE quarantine SET claimed_by = ?, claimed_at = 1.0 WHERE id = ?", (owner, qid))

            # Then release and discard are refused, and nothing is left in flight here
            with pytest.raises(QuarantineStateError, match=f"being released by process {owner}"):
                policy.release(qid)
            with pytest.raises(QuarantineStateError, match="cannot be discarded"):
                policy.discard(qid)
            assert policy.stats()["releases_in_flight"] == 0

            # And force=True takes the claim over and runs the call once
            token = policy.release(qid, force=True)
            assert token.get(timeout=10) == 5
            settle(token)
            assert policy.flush()  # the outcome is stored by the writer thread
            record = policy.get(qid)
            assert record is not None and record["status"] == "released" and record["claimed_by"] != owner
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(timeout=30)


def test_release_needs_a_running_coordinator(db: str) -> None:
    policy = QuarantinePolicy(db)
    with pytest.raises(CoordinatorNotRunning):
        policy.release("any")
    policy.close()


# -- containment and configuration ------------------------------------------------------------------


def test_a_failing_store_admits_the_call_and_logs_an_error(db: str, caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore(db)
    try:
        policy = QuarantinePolicy(store)
        with running(policy) as coordinator:
            policy.hold("q.add")
            with caplog.at_level(logging.ERROR, logger="tokengate.policies.quarantine"):
                # When the store cannot persist the call, then it runs instead of vanishing
                assert add(4, 5).get(timeout=10) == 9
                # The writer thread logs after it let the call go: wait for the line (bounded).
                deadline = time.monotonic() + 10
                while not any("q.add" in r.getMessage() and "admitted" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "the admitted call was never logged"
                    time.sleep(0.005)
            assert coordinator.running
            assert policy.stats()["store_errors"] == 1
    finally:
        store.close()


def test_an_unopenable_database_never_stops_the_coordinator(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = QuarantinePolicy(str(tmp_path / "missing-dir" / "q.sqlite3"))
    with caplog.at_level(logging.ERROR, logger="tokengate.policies.quarantine"):
        with running(policy):
            policy.hold("q.add")
            assert add(1, 2).get(timeout=10) == 3
            with pytest.raises(QuarantineStoreError):
                policy.list()
    assert any("cannot open the quarantine database" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_default_path_is_in_the_cwd_created_at_start_owner_only(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    policy = QuarantinePolicy()
    expected = tmp_path / DEFAULT_PATH
    assert policy.stats()["path"] == str(expected)
    assert not expected.exists()
    with running(policy):
        assert stat.S_IMODE(expected.stat().st_mode) == 0o600


def test_stats_are_json_ready(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy) as coordinator:
        policy.hold("q.add")
        with pytest.raises(TokenQuarantined):
            add(1, 2)
        section = json.loads(json.dumps(coordinator.stats()))["policies"]["quarantine"]
        assert section["held_operations"] == ["q.add"]
        assert section["records_by_status"]["pending"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spike_factor": 0.5},
        {"spike_factor": "8"},
        {"spike_min_samples": 0},
        {"spike_min_bytes": -1},
        {"spike_window": 10},
        {"poison_failures": 0},
        {"poison_failures": True},
        {"poison_capacity": 0},
        {"store": 42},
        {"poison_ignore": [42]},
        {"spike_baseline_half_life": 0},
        {"write_timeout": 0},
        {"write_timeout": float("inf")},
        {"log_interval": -1},
        {"retry_interval": float("nan")},
        {"queue_size": 0},
        {"clock": 42},
        {"max_records": 0},
        {"max_total_payload_bytes": 10, "max_payload_bytes": 20},
        {"store": QuarantineStore(":memory:"), "max_records": 5},
    ],
)
def test_bad_configuration_is_refused_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        QuarantinePolicy(**kwargs)
