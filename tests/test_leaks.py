"""Settled tokens drop their arguments and are garbage-collected; memory stays bounded."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from tokengate import OperationsCoordinator, TaskToken, TokenKilled, task_token_guard


class Payload:
    """An argument we can watch with a weak reference."""


@task_token_guard(operation_type="consume", tags={"weight": "light"})
def consume(payload: Payload) -> int:
    return 1


@task_token_guard(operation_type="explode", tags={"weight": "light"})
def explode(payload: Payload) -> int:
    raise ValueError("bad payload")


def test_settled_token_holds_no_reference_to_its_arguments(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1):
            payload = Payload()
            ref = weakref.ref(payload)
            token = consume(payload)
            assert await token == 1
            del payload
            gc.collect()
            assert ref() is None, "the settled token (or the coordinator) still references its argument"
            assert token.args is None and token.kwargs is None and token.guarded is None

    run(main())


def test_failed_token_does_not_keep_arguments_through_its_traceback(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1):
            payload = Payload()
            ref = weakref.ref(payload)
            token = explode(payload)
            with pytest.raises(ValueError):
                await token
            del payload
            gc.collect()
            # The function's own frame is in the traceback (for debugging); tokengate's frames are not.
            assert ref() is not None or token.exception() is not None
            token_ref = weakref.ref(token)
            del token
            await asyncio.sleep(0)  # the handle that resumed us holds the awaited token until we yield
            gc.collect()
            assert token_ref() is None

    run(main())


def test_settled_tokens_are_garbage_collected(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=2, workers_per_core=2, history_size=10) as c:
            refs = []
            for _ in range(5):
                tokens = [consume(Payload()) for _ in range(200)]
                await asyncio.gather(*tokens)
                refs.extend(weakref.ref(t) for t in tokens)
                del tokens
            await asyncio.sleep(0)  # the handle that resumed us holds its args until we yield
            gc.collect()
            alive = [r for r in refs if r() is not None]
            assert alive == []
            # This coordinator's tokens only: an earlier test's leftovers (say, held by
            # a captured log record) are that test's business, not this one's.
            assert not [o for o in gc.get_objects() if isinstance(o, TaskToken) and o.coordinator is c]
            assert len(c.history(10)) == 10  # the history is bounded

    run(main())


def test_tokens_killed_while_queued_are_garbage_collected(run: Any) -> None:
    # A killed or timed-out WAITING token stays in its pending deque as a stale
    # entry; once no live token is queued, nothing pops those entries any more.
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1) as c:
            c.pause()
            tokens = [consume(Payload()) for _ in range(20)]
            assert c.kill_operation("consume") == 20
            c.resume()
            results = await asyncio.gather(*tokens, return_exceptions=True)
            assert all(isinstance(r, TokenKilled) for r in results)
            assert await consume(Payload()) == 1  # the class queue is usable again
            refs = [weakref.ref(t) for t in tokens]
            del tokens, results
            await asyncio.sleep(0)
            gc.collect()
            assert [r for r in refs if r() is not None] == [], "the pending queue still holds killed tokens"
            assert c.stats()["pending_total"] == 0

    run(main())
