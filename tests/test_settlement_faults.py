"""Settlement cannot be broken by what one token's outcome or hooks do.

Every accepted call settles exactly once whatever its function raises
(``StopIteration``, ``SystemExit``, a ``BaseException`` subclass, an exception
whose ``__str__`` raises) and whatever a policy hook does while it settles; the
other tokens of the same completion chunk settle too, and ``drain()`` returns.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any, Callable

import pytest

from tokengate import OperationsCoordinator, TokenState, _settlement, task_token_guard
from tokengate.errors import SettlementFailed, deliverable_exception, describe_exception
from tokengate.policy import Policy


class CustomBase(BaseException):
    """A BaseException that is neither SystemExit nor KeyboardInterrupt."""


class StrRaises(Exception):
    def __str__(self) -> str:
        raise ValueError("__str__ of this exception fails")


class StopSubclass(StopIteration):
    pass


@task_token_guard(operation_type="faults.stop_iteration", tags={"weight": "light"})
def empty_next() -> int:
    return next(iter([]))  # type: ignore[no-any-return]


@task_token_guard(operation_type="faults.raise", tags={"weight": "light"})
def raise_it(exc: BaseException) -> None:
    raise exc


@task_token_guard(operation_type="faults.ok", tags={"weight": "light"})
def ok(i: int) -> int:
    return i


def _gather(tokens: list[Any]) -> Any:
    async def go() -> Any:
        return await asyncio.wait_for(asyncio.gather(*tokens, return_exceptions=True), 10)
    return go()


@pytest.mark.parametrize("make_exc, cause_type", [
    (StopIteration, StopIteration),
    (lambda: StopSubclass("x"), StopSubclass),
    (lambda: SystemExit(3), SystemExit),
    (KeyboardInterrupt, KeyboardInterrupt),
])
def test_undeliverable_exceptions_settle_as_runtime_error_with_the_original_as_cause(
        run: Any, make_exc: Callable[[], BaseException], cause_type: type) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            token = raise_it(make_exc())
            neighbours = [ok(i) for i in range(50)]
            results = await _gather([token] + neighbours)
            assert isinstance(results[0], RuntimeError)
            assert isinstance(results[0].__cause__, cause_type)
            assert results[1:] == list(range(50))
            assert token.state is TokenState.FAILED
            report = await coordinator.drain(timeout=10)
            assert report.drained and coordinator.inflight == 0
    run(main())


def test_next_on_an_empty_iterator_settles_for_await_and_for_get(standalone: Any) -> None:
    standalone()
    with pytest.raises(RuntimeError) as info:
        empty_next().get(timeout=10)
    assert isinstance(info.value.__cause__, StopIteration)

    async def main() -> None:
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(empty_next(), 10)
    asyncio.run(main())


def test_a_custom_base_exception_propagates_unchanged(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]):
            error = CustomBase("mine")
            results = await _gather([raise_it(error), ok(1)])
            assert results == [error, 1]
    run(main())


def test_an_exception_whose_str_raises_settles_and_is_described(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            token = raise_it(StrRaises())
            results = await _gather([token, ok(2)])
            assert isinstance(results[0], StrRaises) and results[1] == 2
            assert token.status()["error"] == "StrRaises: <str() of the exception failed>"
            assert coordinator.stats()["counts"]["failed"] == 1
    run(main())


def test_describe_and_deliverable_helpers() -> None:
    assert describe_exception(ValueError("bad")) == "ValueError: bad"
    assert describe_exception(ValueError()) == "ValueError"
    assert describe_exception(StrRaises()) == "StrRaises: <str() of the exception failed>"
    plain = ValueError("x")
    assert deliverable_exception(plain) is plain
    wrapped = deliverable_exception(StopIteration())
    assert type(wrapped) is RuntimeError and isinstance(wrapped.__cause__, StopIteration)


class _HookRaises(Policy):
    """Raises *exc* from one hook, for the tokens of one operation type."""

    name = "hook_raises"

    def __init__(self, hook: str, exc: BaseException) -> None:
        self.hook = hook
        self.exc = exc

    def interested(self, guarded: Any) -> bool:
        return bool(guarded.operation_type == "faults.ok")

    def after_run(self, token: Any) -> float | None:
        if self.hook == "after_run":
            raise self.exc
        return None

    def on_settle(self, token: Any) -> None:
        if self.hook == "on_settle":
            raise self.exc


@pytest.mark.parametrize("hook", ["after_run", "on_settle"])
@pytest.mark.parametrize("exc", [RuntimeError("hook bug"), CustomBase("hook base")], ids=["exception", "base"])
def test_a_hook_raising_while_settling_does_not_stall_the_chunk(
        run: Any, monkeypatch: pytest.MonkeyPatch, hook: str, exc: BaseException) -> None:
    monkeypatch.setattr(_settlement, "DRAIN_CHUNK", 8)  # several chunks without thousands of logged tracebacks

    async def main() -> None:
        async with OperationsCoordinator(policies=[_HookRaises(hook, exc)]) as coordinator:
            tokens = [ok(i) for i in range(40)]
            results = await _gather(tokens)
            assert all(t.settled for t in tokens)
            # A hook that raises (even a BaseException) is logged and ignored:
            # the call keeps its own outcome.
            assert results == list(range(40))
            report = await coordinator.drain(timeout=10)
            assert report.drained and coordinator.inflight == 0
    run(main())


def test_a_waiter_that_raises_does_not_keep_other_waiters_waiting(standalone: Any) -> None:
    standalone()
    release = threading.Event()

    @task_token_guard(operation_type="faults.blocked", tags={"weight": "light"})
    def blocked() -> int:
        release.wait(10)
        return 7

    token = blocked()

    def bad_waiter() -> None:
        raise RuntimeError("a broken waiter callback")

    token._add_waiter(bad_waiter)
    got: list[int] = []
    getter = threading.Thread(target=lambda: got.append(token.get(timeout=10)))
    getter.start()
    release.set()
    getter.join(10)
    assert got == [7]


def test_sys_exit_in_a_function_does_not_stop_the_coordinators_loop(standalone: Any) -> None:
    coordinator = standalone()
    with pytest.raises(RuntimeError):
        raise_it(SystemExit(0)).get(timeout=10)
    assert coordinator.running and ok(5).get(timeout=10) == 5
    assert sys.exc_info() == (None, None, None)


def test_a_failure_inside_settlement_itself_settles_that_token_with_settlement_failed(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[_HookRaises("on_settle", RuntimeError("x"))]) as coordinator:
            original = coordinator._run_settle_hooks
            broken: list[Any] = []

            def explode_once(token: Any, plan: Any) -> None:
                if not broken:  # an internal bug on the first token only
                    broken.append(token)
                    raise KeyboardInterrupt("a bug inside settlement")
                original(token, plan)

            monkeypatch.setattr(coordinator, "_run_settle_hooks", explode_once)
            results = await _gather([ok(i) for i in range(20)])
            failed = [r for r in results if isinstance(r, SettlementFailed)]
            assert len(failed) == 1 and isinstance(failed[0].__cause__, KeyboardInterrupt)
            assert sorted(r for r in results if not isinstance(r, SettlementFailed)) == \
                [i for i in range(20) if i != results.index(failed[0])]
            report = await coordinator.drain(timeout=10)
            assert report.drained and coordinator.inflight == 0
    run(main())
