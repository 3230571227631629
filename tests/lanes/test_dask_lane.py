"""The Dask lane against a real ``distributed.LocalCluster`` of 2 worker processes (one per module).

Every coordinator here connects to the module's cluster by address (as an app
connects to a remote scheduler); the embedded cluster's own start and stop are
tested once, marked slow. Servers listen on 127.0.0.1 only; every wait is
bounded; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

import dask  # noqa: E402

from tokengate import OperationsCoordinator, task_token_guard  # noqa: E402
from tokengate.errors import ConfigurationError, TokenKilled, TokenTimeout, WorkerCrashed  # noqa: E402
from tokengate.lanes import dask as dask_lane  # noqa: E402
from tokengate.lanes import dask_calls, dask_config  # noqa: E402
from tokengate.lanes import _dask_task as dask_task  # noqa: E402
from tokengate.lanes.dask_errors import ClusterUnavailable  # noqa: E402
from tokengate.policies import StickyPolicy  # noqa: E402

from . import dask_functions as df  # noqa: E402

WAIT = 60.0  # upper bound of every wait for the cluster (never reached when things work)


def _until(check: Callable[[], bool], what: str, limit: float = WAIT) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {limit}s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    # allowed_failures=0: a worker that dies during a task fails it at once (KilledWorker), instead
    # of Dask running it again on the other worker (which the crash test's function would kill too).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        local = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                         dashboard_address="127.0.0.1:0", resources=dict(dask_config.LOCAL_RESOURCES))
    try:
        yield local
    finally:
        local.close()


@pytest.fixture
def make(cluster: Any) -> Iterator[Callable[..., OperationsCoordinator]]:
    """Started standalone coordinators connected to the module's cluster, stopped at teardown."""
    made: list[OperationsCoordinator] = []

    def factory(**options: Any) -> OperationsCoordinator:
        options.setdefault("num_cores", 2)
        options.setdefault("policies", [])
        options.setdefault("stop_timeout", 10.0)
        options.setdefault("dask_address", cluster.scheduler_address)
        options.setdefault("warm_dask", True)
        coordinator = OperationsCoordinator(**options)
        coordinator.start()
        made.append(coordinator)
        return coordinator

    yield factory
    for coordinator in made:
        coordinator.stop()


def _wait_for_workers(cluster: Any, n: int = 2) -> None:
    _until(lambda: len(cluster.scheduler_info["workers"]) >= n, f"{n} Dask workers")


def test_results_keywords_closures_and_map(make: Callable[..., OperationsCoordinator]) -> None:
    coordinator = make()
    assert coordinator.ready
    assert [df.square(i).get(timeout=WAIT) for i in range(5)] == [0, 1, 4, 9, 16]
    # Arguments travel as data: a tuple starting with a callable is not read as a Dask task.
    assert df.describe((len, 21), scale=2).get(timeout=WAIT) == ("tuple-with-callable", 42)
    add5 = task_token_guard(operation_type="dask.closure", tags={"lane": "dask"})(df.make_closure(5))
    assert add5(1).get(timeout=WAIT) == 6
    assert df.square.map(range(100)).get(timeout=WAIT) == [i * i for i in range(100)]
    stats = coordinator.stats()
    assert stats["counts"]["completed"] >= 8
    cluster_info = stats["lanes"]["dask"]["cluster"]
    assert cluster_info["state"] == "connected" and cluster_info["required"] and not cluster_info["embedded"]
    assert cluster_info["scheduler_address"].startswith("tcp://127.0.0.1:")
    assert len(cluster_info["workers"]) == 2
    assert all(w["resources"] == dask_config.LOCAL_RESOURCES for w in cluster_info["workers"])
    assert cluster_info["inflight"] == 0 and set(cluster_info["inflight_by_class"]) == {"heavy", "medium", "light"}
    rows = [w for core in stats["lanes"]["dask"]["cores"] for w in core["workers"]]
    assert rows and all(w["lane"] == "dask" for w in rows)


def test_small_results_come_back_with_the_task_and_others_are_fetched(
        make: Callable[..., OperationsCoordinator]) -> None:
    # Given a lane connected to the cluster
    coordinator = make()

    def counts() -> dict[str, Any]:
        info = coordinator.cluster()
        assert info is not None
        return info

    before = counts()
    # When calls return small results, a result over the push limit, and one only cloudpickle sends
    assert [df.square(i).get(timeout=WAIT) for i in range(4)] == [0, 1, 4, 9]
    pushed = counts()
    big = df.payload(dask_task.PUSH_LIMIT * 3).get(timeout=WAIT)
    add2 = df.adder(2).get(timeout=WAIT)
    after = counts()
    # Then the small ones were pushed (no gather), the others were fetched, and every value is intact
    assert pushed["pushed"] - before["pushed"] == 4
    assert big == b"x" * (dask_task.PUSH_LIMIT * 3) and add2(1) == 3
    assert after["pushed"] == pushed["pushed"]
    assert after["completed"] - before["completed"] == 6
    # And events of other shapes on the topic (the scheduler's own about this client) are ignored
    lane = coordinator._dask
    assert lane is not None and coordinator.loop is not None
    for event in [(0.0, {"action": "add-client"}), (0.0, ["no-such-key", b"junk"]), "junk", None]:
        coordinator.loop.call_soon_threadsafe(lane.results.on_pushed, event)
    assert df.square(5).get(timeout=WAIT) == 25


def test_a_pushed_result_waits_in_the_workers_stream_for_the_tasks_end() -> None:
    # Given a worker whose stream to the scheduler is open, and one whose stream has another shape
    class Comm:
        def closed(self) -> bool:
            return False

    class Stream:
        def __init__(self) -> None:
            self.buffer: list[Any] = []
            self.comm = Comm()

    class Worker:
        def __init__(self, stream: Any) -> None:
            self.batched_stream = stream
            self.logged: list[tuple[str, Any]] = []

        def log_event(self, topic: str, msg: Any) -> None:
            self.logged.append((topic, msg))

    usual, other = Worker(Stream()), Worker(object())
    msg = {"op": "log-event", "topic": "t", "msg": ["k", b"v"]}
    # When each queues a result event
    dask_task.queue_event(usual, dict(msg))
    dask_task.queue_event(other, dict(msg))
    # Then the first waits in the buffer (the task's task-finished wakes the stream); the other is logged
    assert usual.batched_stream.buffer == [msg] and usual.logged == []
    assert other.logged == [("t", ["k", b"v"])]


def test_calls_and_kills_from_many_threads_settle_each_token_once(make: Callable[..., OperationsCoordinator]) -> None:
    # Given a lane with few slots (calls queue behind them) and threads that submit and kill at once:
    # the slots are driven by the loop, so every wake-up and every kill here crosses threads.
    coordinator = make(dask_inflight=3)
    tokens: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def submit(offset: int) -> None:
        mine = [(offset + i, df.square(offset + i)) for i in range(40)]
        for _, token in mine[::4]:  # kill every fourth: queued, or already on the cluster
            coordinator.kill(token.token_id)
        with lock:
            tokens.extend(mine)

    threads = [threading.Thread(target=submit, args=(1000 * n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    # Then every token settles exactly once: its value, or TokenKilled; none is lost or settled twice
    assert len(tokens) == 160
    outcomes = {"value": 0, "killed": 0}
    for x, token in tokens:
        try:
            value = token.get(timeout=WAIT)
        except TokenKilled:
            outcomes["killed"] += 1
        else:
            assert value == x * x
            outcomes["value"] += 1
    assert outcomes["value"] + outcomes["killed"] == 160 and outcomes["killed"] >= 1
    counts = coordinator.stats()["counts"]
    assert counts["accepted"] == counts["settled"] == 160 and counts["inflight"] == 0
    _until(lambda: coordinator.stats()["lanes"]["dask"]["cluster"]["inflight"] == 0, "the slots to be free")
    assert df.square(9).get(timeout=WAIT) == 81  # and the slots still serve


def test_exception_arrives_unchanged_with_the_remote_traceback(make: Callable[..., OperationsCoordinator]) -> None:
    make()
    with pytest.raises(KeyError) as info:
        df.fail("missing").get(timeout=WAIT)
    assert info.value.args == ("missing",)
    formatted = "".join(traceback.format_exception(info.value))
    assert "in fail" in formatted  # the frame of the function, as it ran on the Dask worker


def test_awaiting_from_async_code(cluster: Any) -> None:
    async def main() -> list[int]:
        async with OperationsCoordinator(num_cores=2, policies=[], dask_address=cluster.scheduler_address,
                                         warm_dask=True) as coordinator:
            assert coordinator.ready
            return list(await asyncio.gather(*[df.square(i) for i in range(20)]))

    assert asyncio.run(main()) == [i * i for i in range(20)]


def test_kill_before_start_never_runs(make: Callable[..., OperationsCoordinator], tmp_path: Path) -> None:
    coordinator = make()
    coordinator.pause("dask.touch")
    marker = tmp_path / "ran"
    token = df.touch(str(marker))
    result = coordinator.kill(token.token_id)
    assert result.killed
    coordinator.resume("dask.touch")
    with pytest.raises(TokenKilled):
        token.get(timeout=WAIT)
    df.square(2).get(timeout=WAIT)  # the lane still serves
    assert not marker.exists()


def test_kill_while_running_cancels_the_task(make: Callable[..., OperationsCoordinator], cluster: Any,
                                             tmp_path: Path) -> None:
    coordinator = make()
    started, release = tmp_path / "started", tmp_path / "release"
    token = df.block(str(started), str(release))
    _until(started.exists, "the task to start on a Dask worker")
    result = coordinator.kill(token.token_id)
    assert result.killed and "running" in result.message
    with pytest.raises(TokenKilled):
        token.get(timeout=WAIT)
    # The task is cancelled on the cluster (its key released by the scheduler) ...
    _until(lambda: not any(k.startswith("dask.block-") for k in cluster.scheduler.tasks), "the key to be released")
    # ... though the function still runs on its worker thread until it returns.
    release.write_text("go")
    assert df.square(3).get(timeout=WAIT) == 9
    assert coordinator.stats()["lanes"]["dask"]["cluster"]["cancelled"] == 1


def test_timeout_of_a_running_call(make: Callable[..., OperationsCoordinator], cluster: Any,
                                   tmp_path: Path) -> None:
    make()
    started, release = tmp_path / "started", tmp_path / "release"
    token = df.block_with_timeout(str(started), str(release))
    with pytest.raises(TokenTimeout):
        token.get(timeout=WAIT)
    release.write_text("go")
    _until(lambda: not any(k.startswith("dask.block_timeout-") for k in cluster.scheduler.tasks),
           "the timed-out key to be released")
    assert df.square(4).get(timeout=WAIT) == 16


def test_sticky_keys_pin_to_one_dask_worker(make: Callable[..., OperationsCoordinator], cluster: Any) -> None:
    _wait_for_workers(cluster)
    make(policies=[StickyPolicy()])
    by_user = {user: {df.sticky_pid(user).get(timeout=WAIT) for _ in range(4)} for user in range(16)}
    assert all(len(pids) == 1 for pids in by_user.values()), by_user
    # Rendezvous hashing spreads keys: 16 keys all on one of 2 workers has probability 2**-15.
    assert len({next(iter(p)) for p in by_user.values()}) == 2


def test_an_unconfigured_lane_is_made_at_its_first_call(cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    coordinator = OperationsCoordinator(num_cores=1, policies=[], stop_timeout=10.0)
    coordinator.start()
    try:
        assert "dask" not in coordinator.stats()["lanes"]  # nothing of the lane until it is used
        monkeypatch.setenv(dask_config.ADDRESS_ENV, cluster.scheduler_address)  # read when the lane is made
        assert df.square(6).get(timeout=WAIT) == 36
        info = coordinator.stats()["lanes"]["dask"]["cluster"]
        assert info["scheduler_address"] == cluster.scheduler_address and not info["embedded"]
    finally:
        coordinator.stop()


def test_rendezvous_moves_only_the_keys_of_a_worker_that_left() -> None:
    workers = [f"tcp://10.0.0.{i}:1234" for i in range(5)]
    keys = [("sticky", k) for k in range(500)]
    before = {k: dask_calls.rendezvous(k, workers) for k in keys}
    after = {k: dask_calls.rendezvous(k, workers[1:]) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == workers[0]}


def test_drain_with_calls_on_the_cluster(make: Callable[..., OperationsCoordinator]) -> None:
    coordinator = make()
    tokens = [df.nap(0.05) for _ in range(12)]

    async def drain() -> Any:
        return await coordinator.drain(timeout=WAIT)

    report = asyncio.run(drain())
    assert report.drained and report.remaining == 0
    assert [t.get(timeout=0) for t in tokens] == [0.05] * 12
    coordinator.resume()


def test_a_worker_that_dies_mid_call_is_worker_crashed(make: Callable[..., OperationsCoordinator],
                                                       cluster: Any) -> None:
    _wait_for_workers(cluster)
    coordinator = make()
    with pytest.raises(WorkerCrashed, match="died"):
        df.die().get(timeout=WAIT)
    assert coordinator.stats()["lanes"]["dask"]["cluster"]["crashed"] == 1
    _wait_for_workers(cluster)  # the nanny restarts it
    assert df.square(5).get(timeout=WAIT) == 25


def test_unreachable_scheduler_fails_a_required_start() -> None:
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        coordinator = OperationsCoordinator(num_cores=1, policies=[], dask_address="tcp://127.0.0.1:9",
                                            warm_dask=True)
        with pytest.raises(ClusterUnavailable, match="127.0.0.1:9") as info:
            coordinator.start()
    assert info.value.address == "tcp://127.0.0.1:9"
    assert not coordinator.running


def test_unreachable_optional_scheduler_refuses_dask_calls_only() -> None:
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        coordinator = OperationsCoordinator(num_cores=1, policies=[], dask_address="tcp://127.0.0.1:9",
                                            warm_dask=True, dask_optional=True)
        coordinator.start()
        try:
            assert coordinator.ready  # an optional lane does not hold readiness back
            with pytest.raises(ClusterUnavailable):
                df.square(2).get(timeout=WAIT)
            plain = task_token_guard(operation_type="thread.ok")(lambda: "ok")
            assert plain().get(timeout=WAIT) == "ok"
            assert coordinator.stats()["lanes"]["dask"]["cluster"]["state"] in ("unavailable", "connecting")
        finally:
            coordinator.stop()


def test_options_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="dask_inflight"):
        OperationsCoordinator(dask_inflight=-1)
    with pytest.raises(ConfigurationError, match="warm_dask"):
        OperationsCoordinator(warm_dask="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="dask_address"):
        OperationsCoordinator(dask_address="  ")
    coordinator = OperationsCoordinator(dask_inflight=0, policies=[])
    coordinator.start()
    try:
        assert "dask" not in coordinator.stats()["lanes"]
        with pytest.raises(ConfigurationError, match="dask_inflight"):
            df.square(1)
    finally:
        coordinator.stop()


def test_without_distributed_decorating_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dask_config, "distributed_available", lambda: False)
    with pytest.raises(ConfigurationError, match=r"tokengate\[dask\]"):
        task_token_guard(operation_type="x", tags={"lane": "dask"})(df.square.__wrapped__)
    with pytest.raises(ConfigurationError, match=r"tokengate\[dask\]"):
        OperationsCoordinator(dask_address="tcp://127.0.0.1:8786")
    assert "dask" not in OperationsCoordinator(policies=[])._routers  # no lane, no error, when not asked for


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _helpers() -> set[int]:
    """multiprocessing's resource tracker (and a forkserver): started once per process, they live until it exits."""
    found = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmdline or "forkserver" in cmdline:
            found.add(p.pid)
    return found


@pytest.mark.slow
def test_embedded_cluster_starts_and_leaves_no_process_behind() -> None:
    before = _descendants()
    coordinator = OperationsCoordinator(num_cores=1, policies=[], warm_dask=True, dask_local_workers=2)
    coordinator.start()
    try:
        assert coordinator.ready
        info = coordinator.stats()["lanes"]["dask"]["cluster"]
        assert info["embedded"] and len(info["workers"]) == 2
        assert info["scheduler_address"].startswith("tcp://127.0.0.1:")
        assert {df.worker_pid().get(timeout=WAIT) for _ in range(4)} <= _descendants()
        assert _descendants() - before
    finally:
        coordinator.stop()
    _until(lambda: not (_descendants() - before - _helpers()), "the embedded cluster's processes to end", limit=20)


def test_a_finished_result_waits_for_others_only_while_the_cluster_is_saturated() -> None:
    # Given a lane that knows of 2 worker threads (no connection needed to decide when to fetch)
    async def scenario() -> tuple[bool, bool, bool]:
        lane = dask_lane.DaskLane(name="rule", address="tcp://127.0.0.1:1", local_workers=2, optional=True,
                                  warm=False)
        lane.threads = 2
        results = lane.results

        def call(i: int) -> dask_calls.DaskCall:
            c = dask_calls.DaskCall(df.square, (i,), None, "heavy", None, f"k{i}")
            c.submitted_at = time.perf_counter() - 1.0  # on the cluster for a second: a 100 ms wait at most
            lane.calls.inflight.add(c)
            return c

        calls = [call(i) for i in range(5)]
        # When one of 5 calls finishes while the other 4 are still out
        results._queue_gather(calls[0])
        saturated_waits = results._gather_later is not None and not results._gather_soon
        results._start_gather()  # (its batch is fetched; the test's calls have no futures: nothing is sent)
        # When a call finishes while 2 others are being fetched and 1 is still out (the cluster has room)
        results._to_gather.clear()
        results._fetching = 2
        lane.calls.inflight = set(calls[1:])
        results._queue_gather(calls[1])
        room_fetches_now = results._gather_soon and results._gather_later is None
        # When a lone call finishes
        results._start_gather()
        results._fetching = 0
        lane.calls.inflight = {calls[4]}
        results._queue_gather(calls[4])
        lone_fetches_now = results._gather_soon and results._gather_later is None
        results._start_gather()
        return saturated_waits, room_fetches_now, lone_fetches_now

    saturated_waits, room_fetches_now, lone_fetches_now = asyncio.run(scenario())
    # Then only the saturated cluster's result waits for others; the calls being fetched do not count as out
    assert saturated_waits
    assert room_fetches_now
    assert lone_fetches_now
