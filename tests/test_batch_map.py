"""``fn.map(...)``: results in order, the first failing item raises, chunks, both lanes, sync and async."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tokengate import OperationsCoordinator, TokenState, task_token_guard
from tokengate.batch import MAX_DEFAULT_CHUNK, default_chunksize
from tokengate.errors import ConfigurationError, CoordinatorNotRunning

from tests.lanes import lane_functions as lf

seen_threads: set[int] = set()


@task_token_guard(operation_type="map.inc", tags={"weight": "light"})
def inc(x: int) -> int:
    seen_threads.add(threading.get_ident())
    return x + 1


@task_token_guard(operation_type="map.add", tags={"weight": "light"})
def add(x: int, y: int) -> int:
    return x + y


@task_token_guard(operation_type="map.fail_on", tags={"weight": "light"})
def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise ValueError(f"item {x}")
    return x


def test_thread_lane_map_returns_results_in_order_from_chunk_calls(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            call = inc.map(range(10_000), chunksize=100)
            assert len(call) == 100
            assert await call == [x + 1 for x in range(10_000)]
            assert coordinator.stats()["counts"]["completed"] == 100
            rows = coordinator.history(limit=1)
            assert rows[0].operation_type == "map.inc[map]"
    run(main())


def test_map_zips_several_iterables_like_the_builtin(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]):
            assert await add.map([1, 2, 3], [10, 20, 30, 40]) == [11, 22, 33]
            assert await add.map([], []) == []
    run(main())


def test_the_first_failing_item_raises_and_unstarted_chunks_are_killed(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], workers_per_core=1) as coordinator:
            coordinator.pause("map.fail_on[map]")  # nothing starts until the failure is decided
            call = fail_on.map(range(100), [3] * 100, chunksize=10)
            coordinator.resume("map.fail_on[map]")
            with pytest.raises(ValueError, match="item 3"):
                await call
            await coordinator.drain(timeout=10)
            states = {t.state for t in call.tokens[1:]}
            assert states <= {TokenState.KILLED, TokenState.COMPLETED}
            coordinator.resume()
    run(main())


def test_map_from_sync_code_with_get(standalone: Any) -> None:
    standalone()
    assert inc.map(range(50)).get(timeout=30) == list(range(1, 51))


def test_bad_chunksize_and_no_iterable_are_configuration_errors(standalone: Any) -> None:
    standalone()
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ConfigurationError, match="chunksize"):
            inc.map(range(3), chunksize=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="iterable"):
        inc.map()


def test_map_without_a_coordinator_says_how_to_start_one() -> None:
    with pytest.raises(CoordinatorNotRunning):
        inc.map([1])


def test_default_chunksize() -> None:
    assert default_chunksize(10, 8) == 1
    assert default_chunksize(100_000, 8) == MAX_DEFAULT_CHUNK
    assert default_chunksize(100_000, 4, process=True) == 4 * MAX_DEFAULT_CHUNK
    assert default_chunksize(0, 8) == 1


def test_process_lane_map_ships_chunks_to_worker_processes(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], process_workers=2) as coordinator:
            assert await lf.square.map(range(5_000), chunksize=500) == [x * x for x in range(5_000)]
            with pytest.raises(ValueError, match="boom"):
                await lf.fail.map(["boom"])
            assert coordinator.stats()["counts"]["completed"] >= 10
    run(main())


def test_a_decorated_function_pickles_as_its_import_path() -> None:
    import pickle

    assert pickle.loads(pickle.dumps(lf.square)) is lf.square
    assert pickle.loads(pickle.dumps(inc)) is inc

    @task_token_guard(operation_type="map.local", tags={"weight": "light"})
    def local() -> None:
        return None

    with pytest.raises(pickle.PicklingError):
        pickle.dumps(local)
