"""A call that blocks on its own children never deadlocks the pool, even when children come back late."""

from __future__ import annotations

import threading
from typing import Any

from tokengate import OperationsCoordinator, RetryPolicy, task_token_guard

attempts: dict[str, int] = {}
lock = threading.Lock()


@task_token_guard(operation_type="flaky_child", tags={"weight": "light", "retries": 2, "retry_backoff": 0.001})
def flaky_child(key: str) -> str:
    with lock:
        attempts[key] = attempts.get(key, 0) + 1
        n = attempts[key]
    if n < 3:
        raise ConnectionError(f"attempt {n}")
    return f"{key} ok after {n}"


@task_token_guard(operation_type="parent", tags={"weight": "light"})
def parent(key: str) -> str:
    # Blocks a worker on a child that fails twice: each retry re-enters routing
    # after a backoff and may land behind this very worker.
    return flaky_child(key).get(timeout=20)


def test_parent_waiting_on_a_retried_child_on_a_single_worker_completes(run: Any) -> None:
    attempts.clear()

    async def main() -> None:
        async with OperationsCoordinator(policies=[RetryPolicy()], num_cores=1, workers_per_core=1):
            assert await parent("a") == "a ok after 3"

    run(main())


def test_more_parents_than_workers_each_waiting_on_retried_children(run: Any) -> None:
    import asyncio

    attempts.clear()

    async def main() -> None:
        async with OperationsCoordinator(policies=[RetryPolicy()], num_cores=1, workers_per_core=2):
            results = await asyncio.wait_for(asyncio.gather(*[parent(f"k{i}") for i in range(6)]), 30)
            assert results == [f"k{i} ok after 3" for i in range(6)]

    run(main())
