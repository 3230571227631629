"""Races at the edges of the lifecycle: submit vs stop and drain, resume vs kill,
retries vs a cancelled awaiter, a failed start, cross-loop bridges, leaks of
dynamically decorated functions.

Each race is forced into the bad order with events or by wrapping one internal
step, never by sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
import weakref
from typing import Any

import pytest

from tokengate import OperationsCoordinator, TokenState, task_token_guard
from tokengate.coordinator import MAX_PAUSED_OPERATIONS
from tokengate.errors import ConfigurationError, GateClosed, TokenKilled
from tokengate.policies import RetryPolicy, StickyPolicy
from tokengate.policy import Policy


class BlockInBeforeSubmit(Policy):
    """Holds the submitting thread inside before_submit until released (like a slow fingerprint)."""

    name = "block_before_submit"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def interested(self, guarded: Any) -> bool:
        return bool(guarded.operation_type == "races.slow_submit")

    def before_submit(self, token: Any) -> None:
        self.entered.set()
        assert self.release.wait(10), "the test never released the submit"


@task_token_guard(operation_type="races.slow_submit", tags={"weight": "light", "sticky_anchor": "acct"})
def slow_submit(x: int) -> int:
    return x


@task_token_guard(operation_type="races.quick", tags={"weight": "light"})
def quick(x: int) -> int:
    return x


def _submit_in_thread(results: list[Any]) -> threading.Thread:
    def go() -> None:
        try:
            results.append(slow_submit(1).get(timeout=10))
        except BaseException as exc:  # noqa: BLE001 - the outcome is what the test checks
            results.append(exc)
    thread = threading.Thread(target=go)
    thread.start()
    return thread


def test_a_submit_racing_stop_is_refused_and_releases_its_pin() -> None:
    blocker, sticky = BlockInBeforeSubmit(), StickyPolicy()
    coordinator = OperationsCoordinator(policies=[blocker, sticky], stop_timeout=5)
    coordinator.start()
    results: list[Any] = []
    thread = _submit_in_thread(results)
    assert blocker.entered.wait(10)
    # The submit passed the gate and sits in before_submit; the whole stop runs now.
    coordinator.stop()
    blocker.release.set()
    thread.join(10)
    assert len(results) == 1 and isinstance(results[0], GateClosed), results
    assert sticky.stats()["pins"] == 0 and sticky.stats()["inflight"] == 0


def test_a_submit_racing_drain_is_refused_not_accepted_after_drained(run: Any) -> None:
    async def main() -> None:
        blocker = BlockInBeforeSubmit()
        async with OperationsCoordinator(policies=[blocker, StickyPolicy()]) as coordinator:
            results: list[Any] = []
            thread = _submit_in_thread(results)
            await asyncio.get_running_loop().run_in_executor(None, blocker.entered.wait, 10)
            report = await coordinator.drain(timeout=5)
            assert report.drained and report.remaining == 0
            blocker.release.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
            assert len(results) == 1 and isinstance(results[0], GateClosed), results
            assert coordinator.inflight == 0
            coordinator.resume()
            assert await quick(3) == 3
    run(main())


def test_resume_skips_a_held_call_killed_before_its_reroute_and_reroutes_the_rest(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            coordinator.pause("races.quick")
            tokens = [quick(i) for i in range(4)]
            assert all(t.state is TokenState.WAITING for t in tokens)
            original = coordinator._reroute
            killed: list[Any] = []

            def kill_then_reroute(token: Any) -> None:
                # The kill lands between release_held() and this token's reroute.
                # From another thread, as an operator's kill would come: its
                # settlement reaches the loop later, so the token still holds its call.
                if not killed:
                    killed.append(token)
                    killer = threading.Thread(target=lambda: killed.append(token.kill("operator").killed))
                    killer.start()
                    killer.join(10)
                    assert killed[1] is True and token._guarded is not None
                original(token)

            monkeypatch.setattr(coordinator, "_reroute", kill_then_reroute)
            coordinator.pause()  # so the released calls are queued as pending, not placed in a mailbox
            coordinator.resume("races.quick")
            coordinator.resume()
            results = await asyncio.wait_for(asyncio.gather(*tokens, return_exceptions=True), 10)
            assert isinstance(results[0], TokenKilled)
            assert results[1:] == [1, 2, 3]
            assert coordinator.inflight == 0
    run(main())


def test_a_reroute_that_fails_settles_that_call_and_not_the_others(
        run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            coordinator.pause("races.quick")
            tokens = [quick(i) for i in range(3)]
            original = coordinator._route_with_hooks

            def broken_for_first(token: Any, plan: Any, *, refuse: bool) -> None:
                if token is tokens[0]:
                    raise RuntimeError("a routing bug")
                original(token, plan, refuse=refuse)

            monkeypatch.setattr(coordinator, "_route_with_hooks", broken_for_first)
            coordinator.resume("races.quick")
            results = await asyncio.wait_for(asyncio.gather(*tokens, return_exceptions=True), 10)
            assert isinstance(results[0], TokenKilled) and results[0].reason == "routing failed"
            assert results[1:] == [1, 2]
    run(main())


def test_no_retry_after_the_awaiter_is_cancelled(run: Any) -> None:
    started = threading.Event()
    release = threading.Event()
    attempts: list[int] = []

    @task_token_guard(operation_type="races.flaky", tags={"weight": "light", "retries": 6, "retry_backoff": 0})
    def flaky() -> None:
        attempts.append(1)
        started.set()
        release.wait(10)
        raise ValueError("always")

    async def main() -> None:
        async with OperationsCoordinator(policies=[RetryPolicy()]) as coordinator:
            token = flaky()
            task = asyncio.ensure_future(token)
            await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
            task.cancel()  # the client went away while the first attempt runs
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            report = await coordinator.drain(timeout=10)
            assert report.drained
            assert token.state is TokenState.FAILED
            assert len(attempts) == 1
    run(main())


class FailsOnStart(Policy):
    name = "fails_on_start"

    def on_start(self, coordinator: Any) -> None:
        raise RuntimeError("cannot start")


class RecordsStartStop(Policy):
    name = "records"

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_start(self, coordinator: Any) -> None:
        self.events.append("start")

    def on_stop(self, coordinator: Any) -> None:
        self.events.append("stop")


@pytest.mark.parametrize("mode", ["attached", "standalone"])
def test_a_failed_start_undoes_what_it_did(run: Any, mode: str) -> None:
    recorder = RecordsStartStop()
    coordinator = OperationsCoordinator(policies=[recorder, FailsOnStart()], name=f"failing-{mode}")
    if mode == "attached":
        async def main() -> None:
            with pytest.raises(RuntimeError, match="cannot start"):
                await coordinator.astart()
            await coordinator.aclose()
        run(main())
    else:
        with pytest.raises(RuntimeError, match="cannot start"):
            coordinator.start()
        coordinator.stop()
    assert recorder.events == ["start", "stop"]
    assert not [t for t in threading.enumerate() if t.name.startswith(f"failing-{mode}")]
    assert not coordinator.running
    # The autouse fixture in conftest also fails the test if a worker thread is left.


def test_tokens_made_in_sync_code_work_with_gather_wait_for_and_shield_through_as_future(standalone: Any) -> None:
    standalone()
    tokens = [quick(i) for i in range(5)]  # bound to the coordinator's own loop

    async def main() -> None:
        assert await asyncio.gather(*[t.as_future() for t in tokens]) == [0, 1, 2, 3, 4]
        assert await asyncio.wait_for(quick(7).as_future(), 10) == 7
        assert await asyncio.shield(quick(8).as_future()) == 8
        assert await tokens[0] == 0  # a bare await bridges by itself

    asyncio.run(main())


def test_as_future_on_the_tokens_own_loop_is_the_token(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]):
            token = quick(1)
            assert token.as_future() is token
            assert await token == 1
    run(main())


def test_cancelling_the_bridge_kills_a_token_that_has_not_started(standalone: Any) -> None:
    coordinator = standalone()
    coordinator.pause()
    token = quick(1)

    async def main() -> None:
        bridge = token.as_future()
        bridge.cancel()
        await asyncio.sleep(0)

    asyncio.run(main())
    coordinator.resume()
    with pytest.raises(TokenKilled):
        token.get(timeout=10)


def test_dynamically_decorated_functions_are_collected(run: Any) -> None:
    def work(blob: bytes, x: int) -> int:
        return len(blob) + x

    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            refs = []
            for i in range(200):
                guarded = task_token_guard(operation_type="races.partial", tags={"weight": "light"})(
                    functools.partial(work, bytes(10_000)))
                assert await guarded(i) == 10_000 + i
                refs.append(weakref.ref(guarded))
                del guarded
            gc.collect()
            alive = sum(1 for r in refs if r() is not None)
            assert alive == 0, f"{alive} decorated partials are still alive"
            assert len(coordinator._plans) == 0
    run(main())


def test_pause_refuses_bad_names_and_bounds_how_many_operations_are_paused(standalone: Any) -> None:
    coordinator = standalone()
    with pytest.raises(ConfigurationError):
        coordinator.pause("")
    with pytest.raises(ConfigurationError):
        coordinator.pause(42)  # type: ignore[arg-type]
    for i in range(MAX_PAUSED_OPERATIONS):
        coordinator.pause(f"op{i}")
    coordinator.pause("op0")  # already paused: no new name
    with pytest.raises(ConfigurationError, match="already paused"):
        coordinator.pause("one-too-many")
    coordinator.resume("op1")
    coordinator.pause("one-too-many")


def test_quarantine_hold_bounds_how_many_operations_are_held(tmp_path: Any) -> None:
    from tokengate.policies import QuarantinePolicy
    from tokengate.policies.quarantine import MAX_HELD_OPERATIONS

    policy = QuarantinePolicy(":memory:")
    for i in range(MAX_HELD_OPERATIONS):
        policy.hold(f"op{i}")
    policy.hold("op0")
    with pytest.raises(ConfigurationError, match="already on hold"):
        policy.hold("one-too-many")
    policy.unhold("op0")
    policy.hold("one-too-many")
    assert len(policy.held_operations()) == MAX_HELD_OPERATIONS


def test_calls_refused_by_a_closed_gate_are_counted_as_rejected(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as coordinator:
            assert await quick(1) == 1
            await coordinator.drain(timeout=5)
            for i in range(5):
                with pytest.raises(GateClosed):
                    quick(i)
            counts = coordinator.stats()["counts"]
            assert counts["rejected"] == 5 and counts["rejected_at_submit"] == 5
            coordinator.resume()
    run(main())
