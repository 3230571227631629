"""The process lane wired into the coordinator: routing, outcomes, crashes, kill, timeout, stop."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import psutil
import pytest

from tokengate import OperationsCoordinator, TokenState, task_token_guard
from tokengate.errors import ConfigurationError, TokenKilled, TokenTimeout, WorkerCrashed

from . import lane_functions as lf


def _wait_for_file(path: Path, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.01)
    raise AssertionError(f"{path} was not written within {timeout}s")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """True once *pid* has exited (or is a zombie), within *timeout* seconds (bounded poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.01)
    return False


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def lane_coordinator() -> Any:
    coordinator = OperationsCoordinator(policies=[], process_workers=2, warm_processes=True, stop_timeout=5,
                                        name="lanetest")
    coordinator.start()
    yield coordinator
    coordinator.stop()


def test_calls_run_in_other_processes_and_return_values(lane_coordinator: Any) -> None:
    assert lf.square(7).get(timeout=30) == 49
    pids = {lf.worker_pid().get(timeout=30) for _ in range(4)}
    assert os.getpid() not in pids
    tokens = [lf.square(i) for i in range(50)]
    assert [t.get(timeout=30) for t in tokens] == [i * i for i in range(50)]
    # The calls above ran on domain 2's process; domain 1's may still be starting (warm start, on its thread).
    deadline = time.monotonic() + 60
    while not lane_coordinator.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lane_coordinator.ready


def test_the_functions_own_exception_arrives_unchanged_with_the_remote_traceback(lane_coordinator: Any) -> None:
    with pytest.raises(ValueError, match="boom") as info:
        lf.fail("boom").get(timeout=30)
    assert "raise ValueError(message)" in str(info.value.__cause__)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_crash_fails_only_its_call_and_the_process_is_replaced(lane_coordinator: Any, how: str) -> None:
    before = [lf.square(i) for i in range(5)]
    with pytest.raises(WorkerCrashed):
        lf.die(how).get(timeout=30)
    after = [lf.square(i) for i in range(20)]
    assert [t.get(timeout=30) for t in before + after] == [i * i for i in range(5)] + [i * i for i in range(20)]


def test_kill_of_a_running_call_ends_its_process(lane_coordinator: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    token = lf.block(str(marker))
    pid = _wait_for_file(marker)
    result = lane_coordinator.kill(token.token_id)
    assert result.killed and "worker process" in result.message
    with pytest.raises(TokenKilled):
        token.get(timeout=30)
    assert token.state is TokenState.KILLED and token.started_at is not None
    assert _gone(pid)
    assert lf.square(3).get(timeout=30) == 9  # the lane keeps serving


def test_a_timeout_ends_the_running_process(lane_coordinator: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    token = lf.block_with_timeout(str(marker))
    pid = _wait_for_file(marker)
    with pytest.raises(TokenTimeout) as info:
        token.get(timeout=30)
    assert info.value.started
    assert _gone(pid)


def test_stop_past_its_grace_ends_running_processes_and_leaves_none(tmp_path: Path) -> None:
    before = _children()
    coordinator = OperationsCoordinator(policies=[], process_workers=2, stop_timeout=0.2, name="lanestop")
    coordinator.start()
    marker = tmp_path / "pid"
    token = lf.block(str(marker))
    _wait_for_file(marker)
    coordinator.stop()
    with pytest.raises(TokenKilled):
        token.get(timeout=5)
    deadline = time.monotonic() + 10
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in _children() - before if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    # The forkserver itself may stay (it is shared by the whole Python process).
    left = [p for p in left if "forkserver" not in " ".join(psutil.Process(p).cmdline())]
    assert not left


def test_process_lane_calls_are_refused_without_a_process_lane(standalone: Any) -> None:
    standalone(process_workers=0)
    with pytest.raises(ConfigurationError, match="process"):
        lf.square(2)


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2"])
def test_bad_process_options_are_refused_at_construction(bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        OperationsCoordinator(process_workers=bad)
    with pytest.raises(ConfigurationError):
        OperationsCoordinator(max_calls_per_process=bad if bad != 1.5 else 0)


def test_functions_that_cannot_travel_are_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="lambda"):
        task_token_guard(operation_type="x", tags={"lane": "process"})(lambda: 1)

    def local() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="inside another function"):
        task_token_guard(operation_type="x", tags={"lane": "process"})(local)
    with pytest.raises(ConfigurationError, match="disagree"):
        task_token_guard(operation_type="x", tags={"lane": "thread", "process_pool": True})(lf.spin.__wrapped__)


def test_process_workers_show_in_stats(lane_coordinator: Any) -> None:
    lf.square(1).get(timeout=30)
    lanes = lane_coordinator.stats()["lanes"]
    rows = [w for core in lanes["process"]["cores"] for w in core["workers"]]
    assert rows and all(w["lane"] == "process" and w["process"]["pid"] for w in rows)


def test_awaiting_from_async_code(lane_coordinator: Any) -> None:
    async def main() -> list[int]:
        return list(await asyncio.gather(*[lf.square(i).as_future() for i in range(10)]))
    assert asyncio.run(main()) == [i * i for i in range(10)]


def test_ready_without_warm_processes_and_warm_without_a_process_lane() -> None:
    lazy = OperationsCoordinator(policies=[], process_workers=2, warm_processes=False, name="lanelazy")
    lazy.start()
    try:
        assert lazy.ready  # processes start at their first call: nothing to wait for
    finally:
        lazy.stop()
    none = OperationsCoordinator(policies=[], process_workers=0, warm_processes=True, name="lanenone")
    none.start()
    try:
        assert none.ready and "process" not in none.stats()["lanes"]
    finally:
        none.stop()


def test_stop_frees_every_worker_process_s_named_semaphore_at_once() -> None:
    # Each worker process's slot lock is a named semaphore. Freed only at interpreter exit, a
    # program that ends by a signal (uvicorn re-raises SIGTERM after its shutdown) left it to
    # the resource tracker, which warned of "leaked semaphore objects" at every such exit.
    coordinator = OperationsCoordinator(policies=[], process_workers=2, warm_processes=True, stop_timeout=5,
                                        name="lanesem")
    coordinator.start()
    try:
        deadline = time.monotonic() + 60
        while not coordinator.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert coordinator.ready
        locks = [weakref.ref(w.child._shared[1]) for w in coordinator._routers["process"].workers]
    finally:
        coordinator.stop()
    gc.collect()
    assert locks and all(lock() is None for lock in locks)


def test_ready_means_every_warm_process_is_attached_to_the_loop_not_just_started() -> None:
    # A process that is up but not yet attached cannot be sent a call: one routed to it waits,
    # and an attached sibling may pull it (a call then runs in a domain its caller did not expect).
    coordinator = OperationsCoordinator(policies=[], process_workers=2, warm_processes=True, stop_timeout=5,
                                        name="laneattach")
    loop_free = threading.Event()
    coordinator.start()
    try:
        loop = coordinator._loop
        assert loop is not None
        # Given the loop held busy, so no started process can attach
        loop.call_soon_threadsafe(loop_free.wait, 60)
        workers = coordinator._routers["process"].workers
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                w.child is not None and w.child.stats().startup_seconds is not None for w in workers):
            time.sleep(0.01)
        assert all(w.child.stats().startup_seconds is not None for w in workers), "the processes did not start"
        # Then the coordinator is not ready while its processes are started but not attached
        assert not coordinator.ready
        assert all(w._link is None for w in workers)
        # and once the loop attaches them it is, with every process's pipe on the loop
        loop_free.set()
        deadline = time.monotonic() + 30
        while not coordinator.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert coordinator.ready
        assert all(w._link is not None for w in workers)
    finally:
        loop_free.set()
        coordinator.stop()


# -- pipelining: several calls in flight to one process -------------------------------------------------------


@pytest.fixture()
def pipelined() -> Any:
    # Light calls on 2 domains run on domain 2's one process: every call below meets the same process.
    coordinator = OperationsCoordinator(policies=[], process_workers=2, warm_processes=True, stop_timeout=5,
                                        name="lanepipe")
    coordinator.start()
    deadline = time.monotonic() + 60
    while not coordinator.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    # The lane sends a process many calls at once only of functions it has seen to be quick.
    for _ in range(3):
        lf.record(os.devnull, -1).get(timeout=30)
        lf.type_name(0).get(timeout=30)
    yield coordinator
    coordinator.stop()


def _shipped(coordinator: Any, tokens: list[Any], timeout: float = 20.0) -> None:
    """Wait until every token is claimed by its process worker (sent to its process, EXECUTING)."""
    workers = [w for core in coordinator._routers["process"].cores.values() for w in core.workers]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(t.state is TokenState.EXECUTING and any(w.carries(t) for w in workers) for t in tokens):
            return
        time.sleep(0.005)
    raise AssertionError(f"not all of {tokens} were sent to a process within {timeout}s")


def _runs(log: Path) -> dict[int, list[int]]:
    runs: dict[int, list[int]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            i, pid = line.split()
            runs.setdefault(int(i), []).append(int(pid))
    return runs


def test_a_crash_in_a_burst_fails_only_its_call_and_the_unstarted_ones_run_once_on_the_replacement(
        pipelined: Any, tmp_path: Path) -> None:
    # Given a process held busy, and ten calls sent to it behind the holder, the sixth of which ends the process
    marker, go, log = tmp_path / "pid", tmp_path / "go", tmp_path / "log"
    holder = lf.hold(str(marker), str(go))
    first_pid = _wait_for_file(marker)
    calls = [lf.record(str(log), i, die=(i == 5)) for i in range(10)]
    _shipped(pipelined, calls)
    # When the process is let go
    go.write_text("go")
    # Then the calls before the crash settle with their results from that process, the crashing one fails,
    assert holder.get(timeout=30) == first_pid
    for i in range(5):
        assert calls[i].get(timeout=30) == first_pid
    with pytest.raises(WorkerCrashed):
        calls[5].get(timeout=30)
    # and the ones it never started ran exactly once, on the replacement
    later = {calls[i].get(timeout=30) for i in range(6, 10)}
    assert len(later) == 1 and first_pid not in later
    runs = _runs(log)
    assert sorted(runs) == list(range(10)) and all(len(pids) == 1 for pids in runs.values())


def test_killing_a_sent_call_the_process_has_not_started_settles_it_at_once_and_it_never_runs(
        pipelined: Any, tmp_path: Path) -> None:
    # Given two calls sent to a process that is busy with a third
    marker, go, log = tmp_path / "pid", tmp_path / "go", tmp_path / "log"
    holder = lf.hold(str(marker), str(go))
    pid = _wait_for_file(marker)
    doomed, kept = lf.record(str(log), 1), lf.record(str(log), 2)
    _shipped(pipelined, [doomed, kept])
    # When the first of them is killed
    result = pipelined.kill(doomed.token_id)
    # Then it settles KILLED at once, without ending the process
    assert result.killed
    with pytest.raises(TokenKilled):
        doomed.get(timeout=5)
    go.write_text("go")
    assert holder.get(timeout=30) == pid and kept.get(timeout=30) == pid
    # and the process skipped it: it never ran
    assert _runs(tmp_path / "log") == {2: [pid]}


def test_a_timeout_of_a_sent_call_not_started_settles_it_and_it_never_runs(pipelined: Any, tmp_path: Path) -> None:
    # Given a call with a 0.5 s timeout sent to a process that stays busy longer than that
    marker, go, log = tmp_path / "pid", tmp_path / "go", tmp_path / "log"
    holder = lf.hold(str(marker), str(go))
    pid = _wait_for_file(marker)
    late = lf.record_with_timeout(str(log), 7)
    # When its timeout passes, Then it settles TIMEOUT
    with pytest.raises(TokenTimeout):
        late.get(timeout=30)
    go.write_text("go")
    assert holder.get(timeout=30) == pid
    # and, once the process is free again, it was never run (a later call on the same process proves it got there)
    assert lf.record(str(log), 8).get(timeout=30) == pid
    assert _runs(log) == {8: [pid]}


def test_killing_a_running_call_ends_its_process_and_the_calls_behind_it_run_once_elsewhere(
        pipelined: Any, tmp_path: Path) -> None:
    # Given three calls sent behind a running one
    marker, go, log = tmp_path / "pid", tmp_path / "go", tmp_path / "log"
    holder = lf.hold(str(marker), str(go), 60.0)
    pid = _wait_for_file(marker)
    behind = [lf.record(str(log), i) for i in range(3)]
    _shipped(pipelined, behind)
    # When the running call is killed
    assert pipelined.kill(holder.token_id).killed
    # Then its process ends, and the calls behind it run exactly once, on the replacement
    with pytest.raises(TokenKilled):
        holder.get(timeout=5)
    pids = {t.get(timeout=30) for t in behind}
    assert len(pids) == 1 and pid not in pids
    assert {i: len(p) for i, p in _runs(log).items()} == {0: 1, 1: 1, 2: 1}


def test_a_crashed_process_is_replaced_in_the_background(pipelined: Any) -> None:
    # Given a process that crashed under a call
    with pytest.raises(WorkerCrashed):
        lf.die("exit").get(timeout=30)
    # When nothing else is called, Then its replacement starts anyway (off the next call's path)
    worker = next(w for core in pipelined.stats()["lanes"]["process"]["cores"] for w in core["workers"]
                  if w["process"]["crashes"])
    deadline = time.monotonic() + 30
    row = worker
    while time.monotonic() < deadline:
        row = next(w for core in pipelined.stats()["lanes"]["process"]["cores"] for w in core["workers"]
                   if w["worker_id"] == worker["worker_id"])
        if row["process"]["state"] == "idle" and row["process"]["restarts"] >= 1:
            break
        time.sleep(0.01)
    assert row["process"]["state"] == "idle" and row["process"]["restarts"] >= 1 and row["process"]["pid"]


def test_arguments_that_do_not_load_in_the_child_fail_only_their_call_in_a_burst(pipelined: Any) -> None:
    from .child_functions import BadOnLoad

    # Given a burst in which one call's argument pickles here but does not unpickle in the process
    async def burst() -> list[Any]:
        tokens = [lf.type_name(i) for i in range(5)] + [lf.type_name(BadOnLoad())] + [lf.type_name("x")]
        return list(await asyncio.gather(*[t.as_future() for t in tokens], return_exceptions=True))
    outcomes = asyncio.run(burst())
    # Then that call fails with PicklingFailed, and every other one runs
    from tokengate.errors import PicklingFailed
    assert outcomes[:5] == ["int"] * 5 and outcomes[6] == "str"
    assert isinstance(outcomes[5], PicklingFailed) and outcomes[5].direction == "arguments"


def test_map_on_the_process_lane_fails_only_the_items_that_do_not_pickle(pipelined: Any) -> None:
    import threading

    from tokengate.errors import PicklingFailed

    items: list[Any] = [1, threading.Lock(), "a", 2.5]
    token = lf.type_name.map(items)
    with pytest.raises(PicklingFailed):
        token.get(timeout=30)  # the first failing item's error, as Executor.map
    assert lf.type_name.map([1, "a", 2.5]).get(timeout=30) == ["int", "str", "float"]


def test_kills_racing_the_process_never_run_a_call_twice_and_every_call_settles_once(
        pipelined: Any, tmp_path: Path) -> None:
    import threading

    # Given 60 calls sent to one process in bursts, and a thread killing every other one while they run
    log = tmp_path / "log"
    tokens = [lf.record(str(log), i) for i in range(60)]
    killer = threading.Thread(target=lambda: [pipelined.kill(t.token_id) for t in tokens[::2]])
    killer.start()
    killer.join(timeout=60)
    assert not killer.is_alive()
    outcomes: list[Any] = []
    for t in tokens:
        try:
            outcomes.append(t.get(timeout=60))
        except (TokenKilled, WorkerCrashed) as exc:
            outcomes.append(exc)
    # Then no call ran twice, every completed call ran exactly once, and only killed calls are missing
    runs = _runs(log)
    assert all(len(pids) == 1 for pids in runs.values())
    for i, (t, outcome) in enumerate(zip(tokens, outcomes)):
        if t.state is TokenState.COMPLETED:
            assert runs.get(i) == [outcome]
        else:
            assert i % 2 == 0 and t.state is TokenState.KILLED


def test_a_crash_during_a_map_chunk_fails_the_map_with_worker_crashed_and_the_lane_serves_on(pipelined: Any) -> None:
    # Given a map whose only chunk ends its process, When it is awaited, Then the map raises WorkerCrashed
    with pytest.raises(WorkerCrashed):
        lf.die.map(["exit"]).get(timeout=30)
    # and the replacement serves the next map
    assert lf.type_name.map([1, "a"]).get(timeout=30) == ["int", "str"]


def test_max_calls_per_process_recycles_between_calls_and_no_call_is_lost() -> None:
    # Given a lane whose processes are replaced every 3 calls
    coordinator = OperationsCoordinator(policies=[], process_workers=2, warm_processes=True, max_calls_per_process=3,
                                        name="lanerecycle")
    coordinator.start()
    try:
        # When 10 light calls run one after the other, and then 30 at once
        pids = [lf.worker_pid().get(timeout=30) for _ in range(10)]
        burst = [lf.worker_pid() for _ in range(30)]
        # Then no process ran more than 3 calls, sent one by one or together, and every call completed,
        assert all(pids.count(pid) <= 3 for pid in set(pids)) and len(set(pids)) >= 4
        burst_pids = [t.get(timeout=60) for t in burst]
        assert all(burst_pids.count(pid) <= 3 for pid in set(burst_pids)) and len(set(burst_pids)) >= 10
        # and the recycles are counted
        rows = [w for core in coordinator.stats()["lanes"]["process"]["cores"] for w in core["workers"]]
        assert sum(w["process"]["recycles"] for w in rows) >= 3
    finally:
        coordinator.stop()
