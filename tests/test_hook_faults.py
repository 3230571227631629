"""Fault injection: a policy hook that raises, and a function that never returns at stop.

* **Hooks.** A ``Faulty`` policy raises in one hook (every call, or every other
  call) while a mixed workload runs: plain, failing, sticky, ordered, tiered,
  retried, timed and killed calls, and a parent that waits (``get()``) on a
  later ordered child on a one-worker coordinator (which only finishes if the
  ``held_behind`` path survives the fault). The contract (``tokengate.policy``):
  a bug in a policy never fails a call. So every call settles exactly once
  with the outcome it would have had without the faulty policy, no pin, slot
  or held call remains, the coordinator keeps serving, and it stops cleanly.
  ``on_start`` raising makes the start fail and undo itself: no thread left,
  the policies that started are stopped. ``on_stop`` and ``stats`` raising
  are logged and contained.
* **A function that blocks "forever" at stop** (on an event the test sets only
  after its checks): ``stop()`` returns (bounded), the call settles as KILLED
  with ``CoordinatorStopped`` (TIMEOUT if its timeout fired first), the call
  queued behind it never runs, its pin and tier slot are released, and the
  coordinator can be closed again; once the function returns, its thread leaves.

Every wait is bounded: a lost call fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

import pytest

from settle_checks import WAIT, SettleRecorder, coordinator_threads, leftovers, wait_threads_gone
from tokengate import (
    CoordinatorNotRunning,
    OperationsCoordinator,
    Policy,
    Rejected,
    TaskToken,
    TokenKilled,
    TokenState,
    TokenTimeout,
    current,
    current_coordinator,
    task_token_guard,
)
from tokengate.errors import CoordinatorStopped
from tokengate.policies import ConductorPolicy, ReputationPolicy, RetryPolicy, StickyPolicy, StorageTierPolicy
from tokengate.policy import PolicyHost

_S = TokenState

#: Hooks called for calls (interested() once per function); on_start/on_stop/stats are tested on their own.
CALL_HOOKS = ("interested", "before_submit", "admit", "pick_core", "on_routed", "after_run", "on_settle",
              "held_behind")


class HookFailure(RuntimeError):
    """What the faulty policy raises."""


class BadStrFailure(Exception):
    """A hook failure whose __str__ raises too (the log line must still be written)."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ failed")


class AbortFailure(BaseException):
    """A BaseException subclass, raised by hooks that run on the coordinator's loop."""


FAILURES: dict[str, Callable[[str], BaseException]] = {
    "runtime_error": lambda hook: HookFailure(f"{hook} failed"),
    "bad_str": lambda hook: BadStrFailure(),
    # A refusal outside before_submit/admit is not a refusal: it must be contained like any error.
    "rejected": lambda hook: Rejected(f"{hook} refused", operation_type="?"),
}


class Faulty(Policy):
    """Overrides every hook with a neutral answer, except that *hook* raises (always, or every other call)."""

    name = "faulty"

    def __init__(self, hook: str, failure: Callable[[str], BaseException], *, every_other: bool = False) -> None:
        self.hook = hook
        self.failure = failure
        self.every_other = every_other
        self._lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.raised = 0
        self.stopped = 0

    def _maybe_raise(self, hook: str) -> None:
        with self._lock:
            n = self.calls[hook] = self.calls.get(hook, 0) + 1
            fire = hook == self.hook and (not self.every_other or n % 2 == 1)
            if fire:
                self.raised += 1
        if fire:
            raise self.failure(hook)

    def on_start(self, coordinator: PolicyHost) -> None:
        self._maybe_raise("on_start")

    def on_stop(self, coordinator: PolicyHost) -> None:
        self.stopped += 1
        self._maybe_raise("on_stop")

    def interested(self, guarded: Any) -> bool:
        self._maybe_raise("interested")
        return True

    def before_submit(self, token: TaskToken[Any]) -> None:
        self._maybe_raise("before_submit")

    def admit(self, token: TaskToken[Any]) -> bool:
        self._maybe_raise("admit")
        return True

    def pick_core(self, token: TaskToken[Any]) -> int | None:
        self._maybe_raise("pick_core")
        return None

    def on_routed(self, token: TaskToken[Any], core: int) -> None:
        self._maybe_raise("on_routed")

    def after_run(self, token: TaskToken[Any]) -> float | None:
        self._maybe_raise("after_run")
        return None

    def on_settle(self, token: TaskToken[Any]) -> None:
        self._maybe_raise("on_settle")

    def held_behind(self, token: TaskToken[Any]) -> TaskToken[Any] | None:
        self._maybe_raise("held_behind")
        return None

    def stats(self) -> dict[str, Any]:
        self._maybe_raise("stats")
        return {"raised": self.raised}


class Lifecycle(Policy):
    """Records on_start/on_stop calls in a shared list (to check order and undo)."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name  # type: ignore[misc]
        self.log = log

    def on_start(self, coordinator: PolicyHost) -> None:
        self.log.append(f"start:{self.name}")

    def on_stop(self, coordinator: PolicyHost) -> None:
        self.log.append(f"stop:{self.name}")


# -- the workload ------------------------------------------------------------------------------------------------

_order_lock = threading.Lock()
_ordered_runs: list[int] = []
_gates: dict[int, threading.Event] = {}


@task_token_guard(operation_type="hf.plain", tags={"weight": "light"})
def hf_plain(x: int) -> int:
    return x * 2


@task_token_guard(operation_type="hf.fails", tags={"weight": "light"})
def hf_fails(x: int) -> int:
    raise ValueError(f"planned {x}")


@task_token_guard(operation_type="hf.sticky", tags={"weight": "heavy", "sticky_anchor": "hf"})
def hf_sticky(key: int, x: int) -> int:
    return key * 100 + x


@task_token_guard(operation_type="hf.ordered", tags={"weight": "heavy", "sticky_anchor": "hfo", "ordered": True,
                                                     "hash_policy": "none"})
def hf_ordered(x: int) -> int:
    with _order_lock:
        _ordered_runs.append(x)
    return x


@task_token_guard(operation_type="hf.tiered", tags={"weight": "light", "storage_speed": "slow"})
def hf_tiered(x: int) -> int:
    return -x


@task_token_guard(operation_type="hf.retried", tags={"weight": "light", "retries": 2, "retry_backoff": 0.001})
def hf_retried(x: int) -> tuple[int, int]:
    token = current.running_token()
    attempt = token.attempt
    if attempt == 1:
        raise ConnectionError("first attempt fails")
    return (x, attempt)


@task_token_guard(operation_type="hf.blocked", tags={"weight": "light", "timeout": 0.05})
def hf_blocked(gate_id: int) -> str:
    _gates[gate_id].wait(WAIT)
    return "released"


@task_token_guard(operation_type="hf.parent", tags={"weight": "heavy"})
def hf_parent(base: int) -> list[int]:
    # Two calls of one ordered key, then wait on the SECOND first: on a one-worker pool this
    # finishes only if the waiting worker runs the first call inline (held_behind), then the second.
    first = hf_ordered(base)
    second = hf_ordered(base + 1)
    return [second.get(timeout=WAIT), first.get(timeout=WAIT)]


def _outcome(token: TaskToken[Any]) -> tuple[str, Any]:
    try:
        return ("ok", token.get(timeout=WAIT))
    except TimeoutError as exc:
        if type(exc) is TimeoutError:
            raise AssertionError(f"{token!r} did not settle within {WAIT}s (a lost call)") from None
        return ("err", exc)
    except BaseException as exc:  # noqa: BLE001 - the outcome, whatever it is
        return ("err", exc)


def run_workload(c: OperationsCoordinator, recorder: SettleRecorder, *, outcomes: bool = True) -> None:
    """Submit the mixed workload, check every outcome (unless not *outcomes*: then only that each settles),
    and check that nothing stays held."""
    with _order_lock:
        _ordered_runs.clear()
    gate = threading.Event()
    _gates[1] = gate
    expected: list[tuple[TaskToken[Any], Callable[[tuple[str, Any]], bool], str]] = []

    def expect(token: TaskToken[Any], check: Callable[[tuple[str, Any]], bool], what: str) -> None:
        expected.append((token, check, what))

    def returns(value: Any) -> Callable[[tuple[str, Any]], bool]:
        return lambda outcome: outcome == ("ok", value)

    for i in range(4):
        expect(hf_plain(i), returns(i * 2), f"plain {i}")
    expect(hf_fails(7), lambda o: o[0] == "err" and type(o[1]) is ValueError and str(o[1]) == "planned 7", "fails")
    for i in range(3):
        expect(hf_sticky(1, i), returns(100 + i), f"sticky {i}")
    for i in range(3):
        expect(hf_ordered(10 + i), returns(10 + i), f"ordered {i}")
    for i in range(3):
        expect(hf_tiered(i), returns(-i), f"tiered {i}")
    expect(hf_retried(5), returns((5, 2)), "retried")
    expect(hf_parent(20), returns([21, 20]), "parent waiting on its later ordered child")
    # A call killed before it starts: its operation is paused, so it waits.
    c.pause("hf.plain")
    victim = hf_plain(99)
    assert victim.kill("fault test").killed
    c.resume("hf.plain")
    expect(victim, lambda o: o[0] == "err" and isinstance(o[1], TokenKilled), "killed")
    # A call that outlives its timeout: TIMEOUT, then its function is let go.
    blocked = hf_blocked(1)
    blocked_outcome = _outcome(blocked)
    gate.set()
    assert (blocked_outcome[0] == "err" and isinstance(blocked_outcome[1], TokenTimeout)) or not outcomes, \
        blocked_outcome
    for token, check, what in expected:
        outcome = _outcome(token)
        assert check(outcome) or not outcomes, f"{what}: {token!r} gave {outcome!r}"
    # Ordered calls of the workload ran one at a time in submission order (the parent's pair too).
    with _order_lock:
        runs = list(_ordered_runs)
    if outcomes:
        assert [r for r in runs if r < 20] == [10, 11, 12], runs
        assert sorted(r for r in runs if r >= 20) == [20, 21], runs
    # Everything settled exactly once (the parent's children included), and nothing is held.
    assert not recorder.violations, recorder.violations
    assert c.inflight == 0, c.stats()["counts"]
    assert not leftovers(c.stats()), leftovers(c.stats())


def _policies(faulty: Policy, recorder: SettleRecorder, first: bool) -> list[Policy]:
    core = [ReputationPolicy(), StickyPolicy(), ConductorPolicy(), StorageTierPolicy(limits={"slow": 1}),
            RetryPolicy()]
    return [faulty, *core, recorder] if first else [*core, faulty, recorder]


# -- hooks that raise ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [True, False], ids=["faulty-first", "faulty-last"])
@pytest.mark.parametrize("every_other", [False, True], ids=["always", "every-other-call"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("hook", CALL_HOOKS)
def test_a_hook_that_raises_fails_no_call(hook: str, failure: str, every_other: bool, first: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    if failure == "rejected" and hook in ("before_submit", "admit"):
        pytest.skip("a Rejected from before_submit or admit is a documented refusal, not a fault")
    if hook == "held_behind" and not first:
        pytest.skip("the sticky policy, earlier in the list, answers held_behind: the faulty one is never asked")
    # Given a coordinator with one worker whose policy list contains a policy that raises in one hook
    faulty = Faulty(hook, FAILURES[failure], every_other=every_other)
    recorder = SettleRecorder()
    c = OperationsCoordinator(num_cores=1, workers_per_core=1, stop_timeout=WAIT, name="hookfault",
                              policies=_policies(faulty, recorder, first)).start()
    try:
        # When the mixed workload runs, twice (the second run is the "keeps serving" check)
        with caplog.at_level(logging.ERROR, logger="tokengate"):
            run_workload(c, recorder)
            run_workload(c, recorder)
        # Then the hook did raise, each failure was logged with the policy's name, and every call
        # had the outcome it would have had without the faulty policy (checked in run_workload)
        assert faulty.raised > 0, f"{hook} was never called: {faulty.calls}"
        assert any("faulty" in r.getMessage() and hook in r.getMessage() for r in caplog.records), \
            [r.getMessage() for r in caplog.records]
        assert c.stats()["counts"]["inflight"] == 0
    finally:
        c.stop()
    # And the coordinator stopped cleanly: no thread left, every policy stopped once
    assert not wait_threads_gone(c)
    assert faulty.stopped == 1


@pytest.mark.parametrize("hook", ["after_run", "on_settle"])
def test_a_base_exception_from_a_loop_hook_strands_no_call(hook: str, caplog: pytest.LogCaptureFixture) -> None:
    # Given a policy raising a BaseException subclass (not an Exception) in a hook run on the loop
    faulty = Faulty(hook, lambda h: AbortFailure(f"{h} aborted"))
    recorder = SettleRecorder()
    c = OperationsCoordinator(num_cores=1, workers_per_core=1, stop_timeout=WAIT, name="hookabort",
                              policies=_policies(faulty, recorder, first=False)).start()
    try:
        # When the workload runs, twice: every call still settles (the outcome may say settlement
        # failed: that is not a policy refusal the contract covers) and nothing stays held
        with caplog.at_level(logging.ERROR, logger="tokengate"):
            run_workload(c, recorder, outcomes=False)
            run_workload(c, recorder, outcomes=False)
        assert faulty.raised > 0
    finally:
        c.stop()
    assert not wait_threads_gone(c)


def test_stats_that_raise_are_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    # Given a policy whose stats() raises
    faulty = Faulty("stats", FAILURES["runtime_error"])
    recorder = SettleRecorder()
    c = OperationsCoordinator(num_cores=1, workers_per_core=1, name="statsfault",
                              policies=_policies(faulty, recorder, first=True)).start()
    try:
        # When statistics are read, then they still come, with the policy's section marked unavailable
        with caplog.at_level(logging.ERROR, logger="tokengate"):
            stats = c.stats()
        assert stats["policies"]["faulty"] == {"error": "stats unavailable"}
        assert "sticky" in stats["policies"] and stats["counts"]["inflight"] == 0
        # and the coordinator still serves
        run_workload(c, recorder)
    finally:
        c.stop()
    assert not wait_threads_gone(c)


@pytest.mark.parametrize("failure", ["runtime_error", "bad_str"])
def test_on_stop_that_raises_still_stops_everything(failure: str, caplog: pytest.LogCaptureFixture) -> None:
    # Given policies around one whose on_stop raises
    log: list[str] = []
    faulty = Faulty("on_stop", FAILURES[failure])
    c = OperationsCoordinator(num_cores=1, workers_per_core=2, name="stopfault",
                              policies=[Lifecycle("a", log), faulty, Lifecycle("b", log)]).start()
    token = hf_plain(3)
    assert token.get(timeout=WAIT) == 6
    # When it stops
    with caplog.at_level(logging.ERROR, logger="tokengate"):
        c.stop()
    # Then the failure is logged, the other policies were still stopped (in reverse order), no thread is left
    assert log == ["start:a", "start:b", "stop:b", "stop:a"], log
    assert faulty.stopped == 1
    assert any("on_stop" in r.getMessage() for r in caplog.records)
    assert not c.running and c.inflight == 0
    assert not wait_threads_gone(c)
    c.stop()  # idempotent


class StartFailure(RuntimeError):
    pass


@pytest.mark.parametrize("mode", ["standalone", "attached"])
def test_a_failed_start_undoes_itself(mode: str) -> None:
    # Given three policies, the second of which fails in on_start
    log: list[str] = []
    failure = StartFailure("on_start failed")

    def fail(hook: str) -> BaseException:
        return failure

    faulty = Faulty("on_start", fail)
    c = OperationsCoordinator(num_cores=2, workers_per_core=2, name=f"startfault-{mode}",
                              policies=[Lifecycle("a", log), faulty, Lifecycle("b", log)])

    # When it starts
    async def attached() -> None:
        with pytest.raises(StartFailure) as info:
            await c.astart()
        assert info.value is failure
        await c.aclose()  # closing a coordinator whose start failed is harmless

    if mode == "standalone":
        with pytest.raises(StartFailure) as info:
            c.start()
        assert info.value is failure
    else:
        asyncio.run(attached())
    # Then the start is undone: no worker or loop thread is left, the policy that started is stopped,
    # the one after the failure never started, and decorated calls find no coordinator
    assert not wait_threads_gone(c), "a failed start left threads running"
    assert log == ["start:a", "stop:a"], log
    assert not c.running
    assert current_coordinator() is not c
    with pytest.raises(CoordinatorNotRunning):
        hf_plain(1)
    c.stop()  # and it can be closed (idempotent)


# -- a function that never returns at stop ---------------------------------------------------------------------


_forever = threading.Event()
_forever_started = threading.Event()
_ran_behind: list[int] = []


@task_token_guard(operation_type="hf.forever", tags={"weight": "light", "sticky_anchor": "forever",
                                                     "storage_speed": "slow"})
def hf_forever(x: int) -> str:
    _forever_started.set()
    _forever.wait(60)  # "forever": the test releases it only after its checks
    return "late"


@task_token_guard(operation_type="hf.forever_timed", tags={"weight": "light", "timeout": 0.05})
def hf_forever_timed(x: int) -> str:
    _forever_started.set()
    _forever.wait(60)
    return "late"


@task_token_guard(operation_type="hf.behind", tags={"weight": "light"})
def hf_behind(x: int) -> int:
    _ran_behind.append(x)
    return x


@pytest.fixture
def forever() -> Any:
    _forever.clear()
    _forever_started.clear()
    _ran_behind.clear()
    yield _forever
    _forever.set()


def _stop_bounded(c: OperationsCoordinator, grace: float) -> None:
    """stop(timeout=grace) on another thread; fail if it has not returned well past its budget."""
    stopper = threading.Thread(target=c.stop, kwargs={"timeout": grace}, name="stopper")
    stopper.start()
    # The documented budget is grace + 0.5 s; WAIT more is slack for a loaded machine, not a speed claim.
    stopper.join(grace + 0.5 + WAIT)
    assert not stopper.is_alive(), f"stop(timeout={grace}) did not return"


@pytest.mark.parametrize("faulty_settle", [False, True], ids=["policies-ok", "on_settle-raises"])
def test_stop_with_a_function_that_never_returns(forever: threading.Event, faulty_settle: bool) -> None:
    # Given one worker stuck in a function that holds a sticky pin and a tier slot, and a call queued behind
    # it (and maybe a policy whose on_settle raises, first in the list: its hook runs last)
    recorder = SettleRecorder()
    extra: list[Policy] = [Faulty("on_settle", FAILURES["runtime_error"])] if faulty_settle else []
    c = OperationsCoordinator(num_cores=1, workers_per_core=1, name="forever", stop_timeout=WAIT,
                              policies=[*extra, StickyPolicy(), StorageTierPolicy(limits={"slow": 1}), RetryPolicy(),
                                        recorder]).start()
    stuck = hf_forever(1)
    assert _forever_started.wait(WAIT)
    queued = hf_behind(2)
    awaited_elsewhere: list[BaseException] = []

    async def await_from_another_loop() -> None:
        try:
            await stuck
        except BaseException as exc:  # noqa: BLE001
            awaited_elsewhere.append(exc)

    waiter = threading.Thread(target=asyncio.run, args=(await_from_another_loop(),), name="other-loop")
    waiter.start()
    # When the coordinator stops with a short grace
    _stop_bounded(c, 0.1)
    # Then both calls settled as stopped (the stuck one while its thread still runs), the queued one never ran
    assert stuck.state is _S.KILLED and queued.state is _S.KILLED
    with pytest.raises(CoordinatorStopped):
        stuck.get(timeout=WAIT)
    with pytest.raises(CoordinatorStopped):
        queued.get(timeout=WAIT)
    waiter.join(WAIT)
    assert not waiter.is_alive() and len(awaited_elsewhere) == 1
    assert isinstance(awaited_elsewhere[0], CoordinatorStopped)
    assert _ran_behind == []
    # and nothing is held: not the pin, not the tier slot; every token settled once
    assert not leftovers(c.stats()), leftovers(c.stats())
    assert not recorder.violations and recorder.total() == 2
    # and the coordinator can be closed again, from sync and async code
    c.stop()
    asyncio.run(c.aclose())
    assert [t.name for t in coordinator_threads(c)] == ["forever-core1-w0"]  # only the stuck worker
    # When the function finally returns, its thread leaves and its late result changes nothing
    forever.set()
    assert not wait_threads_gone(c)
    assert stuck.state is _S.KILLED


def test_stop_after_the_timeout_of_a_function_that_never_returns(forever: threading.Event) -> None:
    # Given a timed call stuck in its function, already settled as TIMEOUT
    c = OperationsCoordinator(num_cores=1, workers_per_core=1, name="forever-timed", policies=[]).start()
    stuck = hf_forever_timed(1)
    with pytest.raises(TokenTimeout) as info:
        stuck.get(timeout=WAIT)
    assert info.value.started
    # When the coordinator stops
    _stop_bounded(c, 0.0)
    # Then the call stays TIMEOUT (settled once), nothing is in flight, and its thread leaves once it returns
    assert stuck.state is _S.TIMEOUT
    assert c.inflight == 0
    forever.set()
    assert not wait_threads_gone(c)


def test_aclose_with_a_function_that_never_returns_in_attached_mode(forever: threading.Event) -> None:
    # Given an attached coordinator whose only worker is stuck, and a call queued behind it
    async def main() -> tuple[TaskToken[Any], TaskToken[Any], OperationsCoordinator]:
        c = OperationsCoordinator(num_cores=1, workers_per_core=1, name="forever-attached", policies=[])
        await c.astart()
        stuck = hf_forever(1)
        queued = hf_behind(2)
        while not _forever_started.is_set():
            await asyncio.sleep(0.001)
        # When it closes with a short grace (bounded by the wait_for: a hang fails the test)
        await asyncio.wait_for(c.aclose(timeout=0.1), 0.1 + 0.5 + WAIT)
        # Then awaiters get CoordinatorStopped at once
        for token in (stuck, queued):
            with pytest.raises(CoordinatorStopped):
                await token
        return stuck, queued, c

    stuck, queued, c = asyncio.run(main())
    assert stuck.state is _S.KILLED and queued.state is _S.KILLED and _ran_behind == []
    assert c.inflight == 0 and not leftovers(c.stats())
    forever.set()
    assert not wait_threads_gone(c)
