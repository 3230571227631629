"""The process lane wired into the coordinator: routing, outcomes, crashes, kill, timeout, stop."""

from __future__ import annotations

import asyncio
import os
import time
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
    psutil.wait_procs([psutil.Process(pid)] if psutil.pid_exists(pid) else [], timeout=10)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert lf.square(3).get(timeout=30) == 9  # the lane keeps serving


def test_a_timeout_ends_the_running_process(lane_coordinator: Any, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    token = lf.block_with_timeout(str(marker))
    pid = _wait_for_file(marker)
    with pytest.raises(TokenTimeout) as info:
        token.get(timeout=30)
    assert info.value.started
    psutil.wait_procs([psutil.Process(pid)] if psutil.pid_exists(pid) else [], timeout=10)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


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
