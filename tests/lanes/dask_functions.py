"""Decorated Dask-lane functions for tests/lanes/test_dask_lane.py (importable by Dask worker processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from tokengate import task_token_guard


@task_token_guard(operation_type="dask.square", tags={"lane": "dask", "weight": "heavy"})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="dask.describe", tags={"lane": "dask", "weight": "light"})
def describe(first: Any, *, scale: int = 1) -> tuple[str, int]:
    """What the task received: a tuple whose first item is callable must arrive as data, not as a task."""
    if isinstance(first, tuple) and callable(first[0]):
        return ("tuple-with-callable", first[1] * scale)
    return (type(first).__name__, scale)


@task_token_guard(operation_type="dask.fail", tags={"lane": "dask", "weight": "light"})
def fail(message: str) -> None:
    raise KeyError(message)


@task_token_guard(operation_type="dask.pid", tags={"lane": "dask", "weight": "medium"})
def worker_pid() -> int:
    return os.getpid()


@task_token_guard(operation_type="dask.sticky_pid", tags={"lane": "dask", "weight": "light", "sticky_anchor": "user"})
def sticky_pid(user: int) -> int:
    return os.getpid()


@task_token_guard(operation_type="dask.touch", tags={"lane": "dask", "weight": "light"})
def touch(path: str) -> str:
    Path(path).write_text("ran")
    return path


@task_token_guard(operation_type="dask.block", tags={"lane": "dask", "weight": "light"})
def block(started: str, release: str, limit: float = 60.0) -> str:
    """Say it started, then wait (at most *limit* seconds) until *release* exists."""
    Path(started).write_text(str(os.getpid()))
    deadline = time.monotonic() + limit
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
    return "released"


@task_token_guard(operation_type="dask.block_timeout", tags={"lane": "dask", "weight": "light", "timeout": 1.0})
def block_with_timeout(started: str, release: str, limit: float = 60.0) -> str:
    return block.__wrapped__(started, release, limit)  # type: ignore[no-any-return]


@task_token_guard(operation_type="dask.nap", tags={"lane": "dask", "weight": "light"})
def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task_token_guard(operation_type="dask.die", tags={"lane": "dask", "weight": "light"})
def die() -> None:
    os._exit(3)


def make_closure(offset: int) -> Callable[[int], int]:
    """A function cloudpickle must send by value (the process lane refuses these)."""

    def add(x: int) -> int:
        return x + offset

    return add


@task_token_guard(operation_type="dask.payload", tags={"lane": "dask", "weight": "light"})
def payload(size: int) -> bytes:
    """A result of *size* bytes (over the lane's push limit: fetched with a gather)."""
    return b"x" * size


@task_token_guard(operation_type="dask.adder", tags={"lane": "dask", "weight": "light"})
def adder(offset: int) -> Callable[[int], int]:
    """A result only cloudpickle can send (a closure): never pushed, always gathered."""
    return make_closure(offset)
