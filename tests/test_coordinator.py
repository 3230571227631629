"""Coordinator lifecycle and the usage shapes users write (including the seeds' examples)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    OperationsCoordinator,
    TaskToken,
    TokenState,
    WouldDeadlock,
    current_coordinator,
    task_token_guard,
)


@task_token_guard(operation_type="square", tags={"weight": "heavy"})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="boom", tags={"weight": "light"})
def boom(message: str) -> None:
    raise KeyError(message)


def test_async_with_attaches_to_the_running_loop(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            assert coordinator.loop is asyncio.get_running_loop()
            token = square(7)
            assert isinstance(token, TaskToken)
            assert await token == 49
            assert token.state is TokenState.COMPLETED
            assert await asyncio.gather(*[square(i) for i in range(100)]) == [i * i for i in range(100)]
        assert not coordinator.running

    run(main())


def test_function_exception_propagates_unchanged(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]):
            with pytest.raises(KeyError, match="nope") as info:
                await boom("nope")
            # The traceback points into the user's function, not into tokengate's worker.
            assert info.traceback[-1].name == "boom"
            results = await asyncio.gather(boom("a"), square(2), return_exceptions=True)
            assert isinstance(results[0], KeyError) and results[1] == 4

    run(main())


def test_sync_script_shape_from_the_seeds() -> None:
    # The seeds' sync main(): start(), token.get(timeout=...), stop().
    coordinator = OperationsCoordinator(policies=[])
    coordinator.start()
    try:
        tokens = [square(n) for n in [100, 200, 300]]
        assert [t.get(timeout=30) for t in tokens] == [10000, 40000, 90000]
        with pytest.raises(KeyError):
            boom("x").get(timeout=30)
    finally:
        coordinator.stop()
    coordinator.stop()  # idempotent


def test_async_main_calling_start_like_the_seeds(run: Any) -> None:
    # The seeds' async main(): coordinator.start() inside a running loop, then gather.
    async def main() -> list[int]:
        coordinator = OperationsCoordinator(policies=[])
        coordinator.start()
        try:
            tokens = [square(i) for i in range(64)]
            return await asyncio.gather(*tokens)
        finally:
            coordinator.stop()

    assert run(main()) == [i * i for i in range(64)]


def test_fire_and_forget_then_stop_finishes_queued_work() -> None:
    # The seeds' create_json_file loop: tokens never awaited, then stop() - graceful by default.
    done: list[int] = []

    @task_token_guard(operation_type="record")
    def record(i: int) -> None:
        done.append(i)

    coordinator = OperationsCoordinator(policies=[]).start()
    for i in range(10):
        record(i)
    coordinator.stop()
    assert sorted(done) == list(range(10))


def test_token_awaitable_from_another_event_loop(standalone: Any) -> None:
    standalone(num_cores=1, workers_per_core=1)
    token = square(5)  # created with no running loop: bound to the coordinator's loop

    async def other_loop() -> int:
        return await token

    assert asyncio.run(other_loop()) == 25


def test_get_on_the_coordinators_loop_thread_refuses_to_deadlock(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1):
            token = square(3)
            with pytest.raises(WouldDeadlock, match="await token"):
                token.get(timeout=1)
            assert await token == 9

    run(main())


def test_get_timeout_raises_builtin_timeout_error(standalone: Any) -> None:
    standalone(num_cores=1, workers_per_core=1)
    gate = threading.Event()

    @task_token_guard(operation_type="gated")
    def gated() -> str:
        gate.wait(10)
        return "open"

    token = gated()
    with pytest.raises(TimeoutError, match="did not settle within"):
        token.get(timeout=0.05)
    gate.set()
    assert token.get(timeout=10) == "open"


def test_several_coordinators_do_not_interfere(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], name="a") as a:
            async with OperationsCoordinator(policies=[], name="b") as b:
                assert current_coordinator() is b
                await square(2)
                assert b.stats()["counts"]["completed"] == 1
                assert a.stats()["counts"]["completed"] == 0
            assert current_coordinator() is a  # the previous one is current again
            await square(3)
            assert a.stats()["counts"]["completed"] == 1
        assert current_coordinator() is None

    run(main())


def test_nested_calls_from_a_worker_go_to_the_same_coordinator(run: Any) -> None:
    @task_token_guard(operation_type="parent")
    def parent(n: int) -> int:
        return sum(square(i).get(timeout=10) for i in range(n))

    async def main() -> None:
        async with OperationsCoordinator(policies=[], name="outer"):
            async with OperationsCoordinator(policies=[], name="inner", num_cores=1, workers_per_core=1) as inner:
                assert await parent(4) == 0 + 1 + 4 + 9
                assert inner.stats()["counts"]["completed"] == 5

    run(main())


def test_restart_of_a_stopped_coordinator_is_refused() -> None:
    coordinator = OperationsCoordinator(policies=[]).start()
    coordinator.stop()
    with pytest.raises(CoordinatorNotRunning, match="create a new OperationsCoordinator"):
        coordinator.start()
    with pytest.raises(CoordinatorNotRunning, match="is stopped"):
        coordinator.submit(square, (1,), {})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_cores": 0}, "num_cores must be between"),
        ({"workers_per_core": "4"}, "workers_per_core must be an integer"),
        ({"mailbox_size": 0}, "mailbox_size must be between"),
        ({"max_pending": -1}, "max_pending must be between"),
        ({"bulkhead_reserve": 9}, "bulkhead_reserve must be between"),
        ({"stop_timeout": -1}, "stop_timeout"),
        ({"policies": [object()]}, "policies must be Policy instances"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"workers_per_core": True}, "must be an integer"),
    ],
)
def test_options_are_validated_in_the_constructor(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigurationError, match=match):
        OperationsCoordinator(**kwargs)


def test_stats_are_json_ready_and_honest(run: Any) -> None:
    import json

    async def main() -> dict:  # type: ignore[type-arg]
        async with OperationsCoordinator(policies=[], num_cores=2, workers_per_core=2) as c:
            await asyncio.gather(*[square(i) for i in range(50)], return_exceptions=True)
            await asyncio.gather(boom("x"), return_exceptions=True)
            stats = c.stats()
            json.dumps(stats)
            history = c.history(10)
            assert len(history) == 10 and history[0].operation_type == "boom" and not history[0].success
            return stats

    stats = run(main())
    counts = stats["counts"]
    assert counts["completed"] == 50 and counts["failed"] == 1 and counts["inflight"] == 0
    assert counts["accepted"] == counts["settled"] == 51
    assert stats["routed_by_weight"] == {"heavy": 50, "medium": 0, "light": 1}
    assert stats["queue_wait"]["count"] == 51 and stats["run_time"]["p50"] is not None
    assert sum(c["routed_total"] for c in stats["cores"]) == 51
    assert stats["topology"]["total_workers"] == 4


def test_token_status_and_repr(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]):
            token = square(3)
            await token
            status = token.status()
            assert status["state"] == "completed" and status["operation_type"] == "square"
            assert status["queue_wait"] is not None and status["run_time"] is not None
            assert status["core_id"] in (1, 2) and status["worker_id"].startswith("core")
            assert "COMPLETED" in repr(token)
            with pytest.raises(Exception, match="settled by their coordinator"):
                token.set_result(1)

    run(main())


def test_a_burst_of_completions_settles_in_chunks_so_other_callbacks_run_between(run: Any) -> None:
    from tokengate._settlement import DRAIN_CHUNK

    async def main() -> None:
        async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[]) as coordinator:
            n = 3 * DRAIN_CHUNK + 10
            coordinator.pause()
            tokens = [square(i) for i in range(n)]
            coordinator.resume()
            # Hold the loop thread until every call ran: all completions wait for one drain.
            deadline = asyncio.get_running_loop().time() + 10
            while len(coordinator._done) < n and asyncio.get_running_loop().time() < deadline:
                threading.Event().wait(0.005)
            assert len(coordinator._done) == n
            seen: list[int] = []
            asyncio.get_running_loop().call_soon(lambda: seen.append(sum(t.done() for t in tokens)))
            assert await asyncio.gather(*tokens) == [i * i for i in range(n)]
            # The drain was scheduled first; it settled one chunk and yielded to our callback.
            assert seen == [DRAIN_CHUNK]

    run(main())
