"""Type-level expectations for the public API, checked by mypy (see tests/test_typing.py).

Not collected by pytest (no test_ prefix): mypy --strict must accept this file, and
``assert_type`` fails type checking if an inferred type drifts.
"""

from __future__ import annotations

import asyncio

from typing_extensions import assert_type

from tokengate import OperationsCoordinator, TaskToken, task_token_guard


@task_token_guard(operation_type="resize", tags={"weight": "heavy"})
def resize(data: bytes, width: int) -> bytes:
    return data[:width]


@task_token_guard
def bare(x: int) -> str:
    return str(x)


async def main() -> None:
    async with OperationsCoordinator() as coordinator:
        assert_type(coordinator, OperationsCoordinator)
        token = resize(b"abc", 2)
        assert_type(token, TaskToken[bytes])
        assert_type(await token, bytes)
        assert_type(await bare(1), str)
        results = await asyncio.gather(resize(b"a", 1), bare(2))
        assert_type(results, tuple[bytes, str])
        assert_type(resize.__wrapped__(b"x", 1), bytes)
        resize("not bytes", 2)  # type: ignore[arg-type]
        bare()  # type: ignore[call-arg]


def sync_main() -> None:
    coordinator = OperationsCoordinator().start()
    try:
        assert_type(resize(b"x", 1).get(timeout=1.0), bytes)
    finally:
        coordinator.stop()
