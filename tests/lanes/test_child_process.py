"""ChildProcess against real worker processes: outcomes, pickling failures, crashes, terminate, recycling, batches.

Functions the children run live in ``child_functions`` (module level, importable).
Waits for "the call has started" use a marker file the child writes, with a
bounded deadline; no assertion is about speed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from tokengate import ConfigurationError, CoordinatorNotRunning
from tokengate.errors import (
    LaneClosed,
    NestedCallRefused,
    PicklingFailed,
    RemoteError,
    WorkerCrashed,
    WorkerStartFailed,
    WorkerTerminated,
)
from tokengate.lanes import ChildProcess, ProcessState, RemoteTraceback, reference_to

from . import child_functions as cf

ref = reference_to


@pytest.fixture(scope="module")
def child() -> Iterator[ChildProcess]:
    """One process shared by the tests that leave it healthy (each checks its pid did not change)."""
    handle = ChildProcess(name="lanes-test-shared")
    handle.start()
    yield handle
    handle.close()


@pytest.fixture(scope="module")
def crash_handle() -> Iterator[ChildProcess]:
    """One handle that the crash tests kill over and over; each asserts on counter deltas."""
    handle = ChildProcess(name="lanes-test-crash", terminate_grace=0.3)
    handle.start()
    yield handle
    handle.close()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, name="lanes-test-caller")
    thread.start()
    return thread, box


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------- outcomes


def test_start_reports_startup_and_stats(child: ChildProcess) -> None:
    stats = child.stats()
    assert stats.startup_seconds is not None and stats.startup_seconds > 0
    assert stats.pid == child.call(ref(cf.pid)).unwrap()
    assert stats.rss_bytes is not None and stats.rss_bytes > 0
    assert child.state is ProcessState.IDLE
    assert set(stats.as_dict()) >= {"pid", "rss_bytes", "calls", "restarts", "crashes", "state", "startup_seconds"}


def test_value_args_and_kwargs(child: ChildProcess) -> None:
    assert child.call(ref(cf.add), (2,), {"y": 5}).unwrap() == 7
    outcome = child.call(ref(cf.echo), (1, "a"), {"k": [1, 2]})
    assert outcome.ok and outcome.value == ((1, "a"), {"k": [1, 2]})


def test_function_exception_arrives_unchanged_with_remote_traceback(child: ChildProcess) -> None:
    outcome = child.call(ref(cf.fail), ("boom",))
    assert not outcome.ok and type(outcome.error) is ValueError and str(outcome.error) == "boom"
    cause = outcome.error.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail" in cause.tb and "ValueError: boom" in cause.tb
    with pytest.raises(ValueError, match="boom"):
        outcome.unwrap()


def test_remote_traceback_keeps_the_chain(child: ChildProcess) -> None:
    outcome = child.call(ref(cf.fail_chained))
    assert type(outcome.error) is RuntimeError
    assert "KeyError: 'missing'" in str(outcome.error.__cause__)


@pytest.mark.parametrize("func, type_name", [
    (cf.fail_unpicklable_exception, "HoldsALock"),   # does not pickle in the child
    (cf.fail_unloadable_exception, "NeedsTwoArgs"),  # pickles, but does not unpickle here
])
def test_exception_that_cannot_travel_arrives_as_remote_error(child: ChildProcess, func: Any, type_name: str) -> None:
    pid = child.pid
    outcome = child.call(ref(func))
    assert isinstance(outcome.error, RemoteError)
    assert outcome.error.type_name.endswith(type_name)
    assert outcome.error.remote_message in ("cannot pickle me", "first")
    assert type_name in outcome.error.traceback and isinstance(outcome.error.__cause__, RemoteTraceback)
    assert child.pid == pid and child.call(ref(cf.inc), (1,)).unwrap() == 2


def test_unpicklable_arguments_fail_that_call_only(child: ChildProcess) -> None:
    pid = child.pid
    outcome = child.call(ref(cf.take), (threading.Lock(),))
    assert isinstance(outcome.error, PicklingFailed) and outcome.error.direction == "arguments"
    assert "lock" in outcome.error.detail
    outcome = child.call(ref(cf.take), (cf.BadOnLoad(),))  # pickles here, does not unpickle in the child
    assert isinstance(outcome.error, PicklingFailed) and outcome.error.direction == "arguments"
    assert "refuses to be unpickled" in outcome.error.detail
    assert child.pid == pid and child.call(ref(cf.inc), (1,)).unwrap() == 2


def test_unpicklable_results_fail_that_call_only(child: ChildProcess) -> None:
    pid = child.pid
    for func in (cf.return_lock, cf.return_bad_on_load):
        outcome = child.call(ref(func))
        assert isinstance(outcome.error, PicklingFailed) and outcome.error.direction == "result", outcome
    assert child.pid == pid and child.call(ref(cf.inc), (1,)).unwrap() == 2


def test_system_exit_and_keyboard_interrupt_are_outcomes_not_deaths(child: ChildProcess) -> None:
    pid = child.pid
    assert type(child.call(ref(cf.call_sys_exit)).error) is SystemExit
    assert type(child.call(ref(cf.raise_keyboard_interrupt)).error) is KeyboardInterrupt
    assert child.pid == pid and child.call(ref(cf.inc), (1,)).unwrap() == 2


def test_missing_function_is_the_calls_error(child: ChildProcess) -> None:
    from tokengate.lanes import FunctionRef

    outcome = child.call(FunctionRef(cf.__name__, "no_such_function"))
    assert type(outcome.error) is AttributeError


def test_decorated_function_runs_undecorated_in_the_child(child: ChildProcess) -> None:
    assert child.call(ref(cf.guarded_double), (21,)).unwrap() == 42


def test_nested_decorated_call_is_refused_clearly_and_inline_works(child: ChildProcess) -> None:
    outcome = child.call(ref(cf.call_guarded_nested), (2,))
    assert isinstance(outcome.error, NestedCallRefused) and isinstance(outcome.error, CoordinatorNotRunning)
    assert "__wrapped__" in str(outcome.error) and "process-lane worker" in str(outcome.error)
    name, is_not_running, _ = child.call(ref(cf.nested_refusal_details)).unwrap()
    assert (name, is_not_running) == ("NestedCallRefused", True)
    assert child.call(ref(cf.call_guarded_inline), (4,)).unwrap() == 8


def test_context_variables_do_not_cross_nor_leak_between_calls(child: ChildProcess) -> None:
    token = cf.VAR.set("parent-value")
    try:
        assert child.call(ref(cf.read_var)).unwrap() == "unset"
        assert child.call(ref(cf.set_var), ("set-in-child",)).unwrap() == "set-in-child"
        assert child.call(ref(cf.read_var)).unwrap() == "unset"
    finally:
        cf.VAR.reset(token)


def test_one_caller_at_a_time(tmp_path: Path) -> None:
    handle = ChildProcess(name="lanes-test-one-caller", terminate_grace=0.2)
    try:
        marker = tmp_path / "started"
        thread, box = in_thread(lambda: handle.call(ref(cf.mark_and_block), (str(marker),)))
        wait_for(marker.exists, "the blocking call to start")
        with pytest.raises(RuntimeError, match="another thread"):
            handle.call(ref(cf.inc), (1,))
        handle.terminate("test over")
        thread.join(30)
        assert isinstance(box.get("error"), WorkerTerminated)
    finally:
        handle.close()


# ----------------------------------------------------------------- crashes


@pytest.mark.parametrize("how", ["segfault", "os._exit", "self-SIGKILL (OOM killer)"])
def test_a_crash_costs_one_call_and_the_next_call_gets_a_new_process(crash_handle: ChildProcess, how: str) -> None:
    before = crash_handle.stats()
    pid = crash_handle.call(ref(cf.pid)).unwrap()
    func, args = {
        "segfault": (cf.segfault, ()),
        "os._exit": (cf.hard_exit, (5,)),
        "self-SIGKILL (OOM killer)": (cf.kill_self, (int(signal.SIGKILL),)),
    }[how]
    with pytest.raises(WorkerCrashed) as info:
        crash_handle.call(ref(func), args)
    expected = {"segfault": (-signal.SIGSEGV, "SIGSEGV"), "os._exit": (5, None),
                "self-SIGKILL (OOM killer)": (-signal.SIGKILL, "SIGKILL")}[how]
    assert (info.value.exitcode, info.value.signal_name) == expected
    assert info.value.pid == pid and gone(pid)
    assert crash_handle.state is ProcessState.CRASHED and crash_handle.needs_restart
    assert crash_handle.call(ref(cf.inc), (1,)).unwrap() == 2
    after = crash_handle.stats()
    assert after.pid != pid
    assert (after.crashes - before.crashes, after.restarts - before.restarts) == (1, 1)


def test_sigkill_from_outside_during_a_call(crash_handle: ChildProcess, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    thread, box = in_thread(lambda: crash_handle.call(ref(cf.mark_and_block), (str(marker),)))
    wait_for(marker.exists, "the call to start")
    pid = int(marker.read_text())
    os.kill(pid, signal.SIGKILL)
    thread.join(30)
    error = box.get("error")
    assert isinstance(error, WorkerCrashed) and error.signal_name == "SIGKILL" and error.pid == pid
    assert crash_handle.call(ref(cf.inc), (1,)).unwrap() == 2


def test_a_process_killed_while_idle_costs_no_call(crash_handle: ChildProcess) -> None:
    pid = crash_handle.call(ref(cf.pid)).unwrap()
    crashes = crash_handle.stats().crashes
    os.kill(pid, signal.SIGKILL)
    # Reaped, not just a zombie: a zombie leader's other thread (the parent watch) may still hold the pipe open
    wait_for(lambda: not psutil.pid_exists(pid), "the idle process to die")
    assert crash_handle.call(ref(cf.inc), (1,)).unwrap() == 2  # replaced before the call was sent
    assert crash_handle.pid != pid and crash_handle.stats().crashes == crashes + 1


# --------------------------------------------------------------- terminate


def test_terminate_from_another_thread_stops_a_blocked_call(tmp_path: Path) -> None:
    handle = ChildProcess(name="lanes-test-terminate", terminate_grace=5.0)
    try:
        marker = tmp_path / "started"
        thread, box = in_thread(lambda: handle.call(ref(cf.mark_and_block), (str(marker), 120.0)))
        wait_for(marker.exists, "the call to start")
        pid = int(marker.read_text())
        assert handle.terminate("operator kill") is True
        thread.join(30)
        error = box.get("error")
        assert isinstance(error, WorkerTerminated) and error.reason == "operator kill" and error.pid == pid
        assert gone(pid) and handle.state is ProcessState.TERMINATED
        assert handle.call(ref(cf.inc), (1,)).unwrap() == 2
        stats = handle.stats()
        assert (stats.terminations, stats.restarts, stats.crashes) == (1, 1, 0)
    finally:
        handle.close()


def test_terminate_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    handle = ChildProcess(name="lanes-test-stubborn", terminate_grace=0.2)
    try:
        marker = tmp_path / "started"
        thread, box = in_thread(lambda: handle.call(ref(cf.ignore_sigterm_mark_and_block), (str(marker), 120.0)))
        wait_for(marker.exists, "the call to start")
        pid = int(marker.read_text())
        handle.terminate("stubborn")
        thread.join(30)
        assert isinstance(box.get("error"), WorkerTerminated)
        assert gone(pid)
    finally:
        handle.close()


def test_call_timeout_terminates_the_process(tmp_path: Path) -> None:
    handle = ChildProcess(name="lanes-test-timeout", terminate_grace=0.2)
    try:
        with pytest.raises(WorkerTerminated) as info:
            handle.call(ref(cf.mark_and_block), (str(tmp_path / "m"), 120.0), timeout=0.3)
        assert info.value.reason == "timeout" and gone(info.value.pid or 0)
        assert handle.call(ref(cf.inc), (1,)).unwrap() == 2
    finally:
        handle.close()


def test_terminate_an_idle_process_and_a_never_started_one() -> None:
    handle = ChildProcess(name="lanes-test-idle-terminate")
    try:
        assert handle.terminate("nothing to stop") is False
        handle.start()
        pid = handle.pid
        assert pid is not None and handle.terminate("idle") is True
        assert gone(pid) and handle.needs_restart
        assert handle.call(ref(cf.inc), (1,)).unwrap() == 2 and handle.pid != pid
    finally:
        handle.close()


def test_close_while_busy_terminates_and_later_calls_are_refused(tmp_path: Path) -> None:
    handle = ChildProcess(name="lanes-test-close", terminate_grace=0.2)
    marker = tmp_path / "started"
    thread, box = in_thread(lambda: handle.call(ref(cf.mark_and_block), (str(marker), 120.0)))
    wait_for(marker.exists, "the call to start")
    pid = int(marker.read_text())
    handle.close()
    thread.join(30)
    assert isinstance(box.get("error"), WorkerTerminated) and box["error"].reason == "closed"
    assert gone(pid) and handle.state is ProcessState.CLOSED
    with pytest.raises(LaneClosed):
        handle.call(ref(cf.inc), (1,))
    handle.close()  # idempotent


# --------------------------------------------------------------- recycling


def test_max_calls_recycles_before_the_next_call() -> None:
    handle = ChildProcess(name="lanes-test-max-calls", max_calls=3)
    try:
        pids = [handle.call(ref(cf.pid)).unwrap() for _ in range(3)]
        assert len(set(pids)) == 1 and handle.stats().recycle_due is not None
        assert handle.call(ref(cf.pid)).unwrap() != pids[0]
        stats = handle.stats()
        assert (stats.recycles, stats.restarts, stats.crashes, stats.calls, stats.calls_since_start) == (1, 1, 0, 4, 1)
    finally:
        handle.close()


def test_max_rss_recycles_before_the_next_call() -> None:
    handle = ChildProcess(name="lanes-test-max-rss", rss_check_interval=0.0)
    try:
        handle.start()
        baseline = handle.stats().rss_bytes
        assert baseline is not None
        handle.close()
        handle = ChildProcess(name="lanes-test-max-rss", rss_check_interval=0.0, max_rss=baseline + 40 * 2**20)
        first = handle.call(ref(cf.pid)).unwrap()
        assert handle.call(ref(cf.pid)).unwrap() == first  # under the ceiling: kept
        handle.call(ref(cf.hoard), (80,)).unwrap()
        assert "max_rss" in (handle.stats().recycle_due or "")
        assert handle.call(ref(cf.pid)).unwrap() != first
        assert handle.stats().recycles == 1
    finally:
        handle.close()


# ------------------------------------------------------------------ batches


def test_call_many_returns_outcomes_in_order(child: ChildProcess) -> None:
    outcomes = child.call_many(ref(cf.inc), [((i,), None) for i in range(2500)], chunksize=1000)
    assert [o.unwrap() for o in outcomes] == list(range(1, 2501))
    assert child.call_many(ref(cf.inc), []) == []


def test_call_many_per_item_failures(child: ChildProcess) -> None:
    pid = child.pid
    outcomes = child.call_many(ref(cf.fail_if), [((i,), None) for i in range(7)], chunksize=3)
    assert [o.ok for o in outcomes] == [False, True, True, False, True, True, False]
    assert type(outcomes[3].error) is ValueError and isinstance(outcomes[3].error.__cause__, RemoteTraceback)
    outcomes = child.call_many(ref(cf.value_or_lock), [((i,), None) for i in range(5)])
    assert [o.ok for o in outcomes] == [True, True, True, False, True]
    assert isinstance(outcomes[3].error, PicklingFailed) and outcomes[3].error.direction == "result"
    items: list[Any] = [((1,), None), ((threading.Lock(),), None), ((cf.BadOnLoad(),), None), ((2,), {})]
    outcomes = child.call_many(ref(cf.take), items)
    assert [o.ok for o in outcomes] == [True, False, False, True]
    assert all(isinstance(o.error, PicklingFailed) and o.error.direction == "arguments" for o in outcomes[1:3])
    outcomes = child.call_many(ref(cf.inc), [((1,), None), "not an item", ((2,), None)])  # type: ignore[list-item]
    assert [o.ok for o in outcomes] == [True, False, True]
    assert child.pid == pid


def test_call_many_crash_costs_its_chunk_and_later_chunks_run(crash_handle: ChildProcess) -> None:
    outcomes = crash_handle.call_many(ref(cf.crash_on), [((i, 5), None) for i in range(12)], chunksize=4)
    assert [o.ok for o in outcomes] == [True] * 4 + [False] * 4 + [True] * 4
    assert all(isinstance(o.error, WorkerCrashed) for o in outcomes[4:8])
    assert [o.value for o in outcomes[8:]] == [8, 9, 10, 11]


def test_call_many_terminated_fails_the_rest(tmp_path: Path) -> None:
    handle = ChildProcess(name="lanes-test-many-terminate", terminate_grace=0.2)
    try:
        marker = tmp_path / "started"
        items = [((str(tmp_path / f"m{i}"), 0.0), None) for i in range(3)] + [((str(marker), 120.0), None)] + \
            [((str(tmp_path / f"n{i}"), 0.0), None) for i in range(6)]
        thread, box = in_thread(lambda: handle.call_many(ref(cf.mark_and_block), items, chunksize=2))
        wait_for(marker.exists, "the blocking item to start")
        handle.terminate("stop the batch")
        thread.join(30)
        outcomes = box["value"]
        assert [o.ok for o in outcomes] == [True, True] + [False] * 8
        assert all(isinstance(o.error, WorkerTerminated) for o in outcomes[2:])
        assert not (tmp_path / "n0").exists()  # nothing after the termination ran
    finally:
        handle.close()


# --------------------------------------------------------- start and options


def test_preload_failure_is_a_start_failure() -> None:
    handle = ChildProcess(name="lanes-test-preload", preload=["tokengate_no_such_module_xyz"])
    try:
        with pytest.raises(WorkerStartFailed, match="tokengate_no_such_module_xyz"):
            handle.start()
    finally:
        handle.close()


def test_preload_imports_before_ready() -> None:
    with ChildProcess(name="lanes-test-preload-ok", preload=[cf.__name__]) as handle:
        assert handle.call(ref(cf.inc), (1,)).unwrap() == 2


@pytest.mark.parametrize("options", [
    {"start_method": "fork"}, {"start_method": "thread"}, {"max_calls": 0}, {"max_calls": True},
    {"max_rss": -1}, {"terminate_grace": -1}, {"start_timeout": "1"}, {"preload": "single.string"},
])
def test_bad_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ChildProcess(**options)


def test_bad_chunksize_is_refused(child: ChildProcess) -> None:
    with pytest.raises(ConfigurationError):
        child.call_many(ref(cf.inc), [((1,), None)], chunksize=0)


def test_call_many_with_keywords_and_context_isolation_between_batches(child: ChildProcess) -> None:
    outcomes = child.call_many(ref(cf.add), [((1,), {"y": 2}), ((3,), None), ((4,), {"y": 1})])
    assert [o.unwrap() for o in outcomes] == [3, 3, 5]
    assert [o.unwrap() for o in child.call_many(ref(cf.set_var), [(("a",), None)])] == ["a"]
    assert [o.unwrap() for o in child.call_many(ref(cf.read_var), [((), None)])] == ["unset"]
