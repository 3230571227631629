"""ProcessPoolLane: warm parallel start, acquire/release, background replacement, batches, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

from tokengate import ConfigurationError
from tokengate.errors import LaneClosed, WorkerCrashed, WorkerStartFailed, WorkerTerminated
from tokengate.lanes import ProcessPoolLane, reference_to

from . import child_functions as cf

ref = reference_to
TESTS_DIR = str(Path(__file__).resolve().parents[1])


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolLane]:
    lane = ProcessPoolLane(2, name="lanes-test-pool")
    lane.start()
    yield lane
    lane.stop()


def test_start_is_parallel_and_stop_leaves_no_process() -> None:
    lane = ProcessPoolLane(2, name="lanes-test-lifecycle")
    times = lane.start()
    assert len(times) == 2 and all(t > 0 for t in times)
    pids = {handle.pid for handle in lane.handles}
    assert len(pids) == 2 and None not in pids
    assert pids <= descendants()
    assert lane.start() == times  # idempotent
    lane.stop()
    assert not ({pid for pid in pids if pid is not None} & descendants())
    assert all(gone(pid) for pid in pids if pid is not None)
    assert not [t for t in threading.enumerate() if t.name.startswith("lanes-test-lifecycle")]
    lane.stop()  # idempotent
    with pytest.raises(LaneClosed):
        lane.acquire()
    with pytest.raises(LaneClosed):
        lane.start()


def test_index_access_and_stats(pool: ProcessPoolLane) -> None:
    assert len(pool) == 2 and pool[0] is pool.handles[0]
    assert pool[1].call(ref(cf.pid)).unwrap() == pool[1].pid
    stats = pool.stats()
    assert [s.name for s in stats] == ["lanes-test-pool-0", "lanes-test-pool-1"]
    assert set(pool.totals()) >= {"calls", "restarts", "crashes", "recycles", "terminations"}


def test_acquire_release_most_recently_used_first(pool: ProcessPoolLane) -> None:
    first = pool.acquire()
    second = pool.acquire()
    with pytest.raises(TimeoutError):
        pool.acquire(timeout=0.01)
    pool.release(first)
    pool.release(second)
    assert pool.acquire() is second
    pool.release(second)
    with pytest.raises(ValueError):
        pool.release(ProcessPoolLane(1).handles[0])


def test_a_waiting_acquire_is_released_by_stop() -> None:
    lane = ProcessPoolLane(1, name="lanes-test-waiter")
    lane.start()
    held = lane.acquire()
    box: dict[str, Any] = {}
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        try:
            lane.acquire()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=waiter)
    thread.start()
    waiting.wait(10)
    lane.stop()
    thread.join(30)
    assert isinstance(box.get("error"), LaneClosed)
    assert held.state.value == "closed"


def test_a_crash_costs_one_call_and_the_handle_is_replaced_in_the_background() -> None:
    lane = ProcessPoolLane(1, name="lanes-test-replace")
    lane.start()
    try:
        pid = lane.call(ref(cf.pid)).unwrap()
        with pytest.raises(WorkerCrashed):
            lane.call(ref(cf.hard_exit), (9,))
        assert lane.call(ref(cf.pid)).unwrap() != pid  # acquire waited for the replacer
        totals = lane.totals()
        assert (totals["crashes"], totals["restarts"], totals["background_replacements"]) == (1, 1, 1)
    finally:
        lane.stop()


def test_call_many_over_the_pool_in_order(pool: ProcessPoolLane) -> None:
    batch = pool.call_batch(ref(cf.inc), [((i,), None) for i in range(5000)])
    assert batch.results() == list(range(1, 5001)) and not batch.errors
    outcomes = pool.call_many(ref(cf.fail_if), [((i,), None) for i in range(10)], chunksize=3)
    assert [o.ok for o in outcomes] == [i % 3 != 0 for i in range(10)]
    with pytest.raises(ValueError, match="bad 0"):
        pool.call_batch(ref(cf.fail_if), [((i,), None) for i in range(4)]).results()
    assert pool.call_many(ref(cf.inc), []) == []
    with pytest.raises(ConfigurationError):
        pool.call_many(ref(cf.inc), [((1,), None)], chunksize=0)


def test_stop_terminates_running_calls_and_leaves_nothing(tmp_path: Path) -> None:
    lane = ProcessPoolLane(2, name="lanes-test-stop-busy", terminate_grace=0.2)
    lane.start()
    pids = {h.pid for h in lane.handles}
    marker = tmp_path / "started"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            lane.call(ref(cf.mark_and_block), (str(marker), 120.0))
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(marker.exists, "the call to start")
    lane.stop(timeout=0.1)
    thread.join(30)
    assert isinstance(box.get("error"), WorkerTerminated) and box["error"].reason == "closed"
    assert not ({pid for pid in pids if pid is not None} & descendants())


def test_a_failed_start_leaves_nothing_running() -> None:
    before = descendants()
    lane = ProcessPoolLane(2, name="lanes-test-bad-start", preload=["tokengate_no_such_module_xyz"])
    with pytest.raises(WorkerStartFailed):
        lane.start()
    assert not lane.running
    wait_for(lambda: descendants() <= before | _forkserver_pids(), "children of the failed start to go")


def _forkserver_pids() -> set[int]:
    # The forkserver itself is a child of this process and outlives any pool.
    return {p.pid for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())}


@pytest.mark.parametrize("ending", ["exit without stop()", "SIGKILL"])
def test_children_do_not_outlive_their_parent(ending: str) -> None:
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {TESTS_DIR!r})
        from tokengate.lanes import ProcessPoolLane, reference_to
        from lanes import child_functions as cf
        pool = ProcessPoolLane(2, name="orphan-check")
        pool.start()
        assert pool.call(reference_to(cf.inc), (1,)).unwrap() == 2
        print(" ".join(str(h.pid) for h in pool.handles), flush=True)
        if {ending!r} == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in result.stdout.split()]
    assert len(pids) == 2, result.stderr
    wait_for(lambda: all(gone(pid) for pid in pids), "the orphaned workers to exit")
    if ending != "SIGKILL":
        assert result.returncode == 0, result.stderr


def test_bad_size_is_refused() -> None:
    for size in (0, -1, True, 1.5):
        with pytest.raises(ConfigurationError):
            ProcessPoolLane(size)  # type: ignore[arg-type]


def test_pool_batch_crash_costs_its_chunk_and_the_pool_recovers() -> None:
    lane = ProcessPoolLane(2, name="lanes-test-batch-crash")
    lane.start()
    try:
        batch = lane.call_batch(ref(cf.crash_on), [((i, 9), None) for i in range(24)], chunksize=4)
        assert sorted(batch.errors) == [8, 9, 10, 11]
        assert all(isinstance(e, WorkerCrashed) for e in batch.errors.values())
        assert [v for i, v in enumerate(batch.values) if i not in batch.errors] == [i for i in range(24) if i // 4 != 2]
        assert lane.call_batch(ref(cf.inc), [((i,), None) for i in range(100)]).results() == list(range(1, 101))
        assert lane.totals()["crashes"] == 1
    finally:
        lane.stop()


def test_pool_batch_terminated_fails_what_did_not_run(tmp_path: Path) -> None:
    lane = ProcessPoolLane(1, name="lanes-test-batch-terminate", terminate_grace=0.2)
    lane.start()
    try:
        marker = tmp_path / "started"
        items = [((str(tmp_path / "a"), 0.0), None), ((str(marker), 120.0), None)] + \
            [((str(tmp_path / f"later{i}"), 0.0), None) for i in range(4)]
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.update(batch=lane.call_batch(ref(cf.mark_and_block), items,
                                                                                  chunksize=1)))
        thread.start()
        wait_for(marker.exists, "the blocking item to start")
        lane[0].terminate("stop the map")
        thread.join(30)
        batch = box["batch"]
        assert sorted(batch.errors) == [1, 2, 3, 4, 5] and batch.values[0] == "finished"
        assert all(isinstance(e, WorkerTerminated) and e.reason == "stop the map" for e in batch.errors.values())
        assert not any((tmp_path / f"later{i}").exists() for i in range(4))
    finally:
        lane.stop()


def test_forkserver_preload_keeps_workers_working() -> None:
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS_DIR!r})
        from tokengate.lanes import ChildProcess, preload_in_forkserver, reference_to
        from lanes import child_functions as cf
        assert preload_in_forkserver() is True
        with ChildProcess(name="preloaded") as handle:
            assert handle.call(reference_to(cf.inc), (1,)).unwrap() == 2
            assert handle.call(reference_to(cf.call_guarded_nested), (1,)).error.__class__.__name__ == "NestedCallRefused"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
