"""Backpressure, Overloaded, pause/resume, drain, kill, timeouts and cancel-on-abandon."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest

from tokengate import (
    GateClosed,
    OperationsCoordinator,
    Overloaded,
    Policy,
    TokenKilled,
    TokenState,
    TokenTimeout,
    task_token_guard,
)
from virtual_time import NEVER, run_virtual

gate = threading.Event()
started = threading.Semaphore(0)
ran: list[str] = []


@task_token_guard(operation_type="blocker", tags={"weight": "light"})
def blocker(label: str = "") -> str:
    started.release()
    gate.wait(10)
    ran.append(label)
    return label


@task_token_guard(operation_type="quick", tags={"weight": "light"})
def quick(x: int) -> int:
    ran.append(f"quick{x}")
    return x


@pytest.fixture(autouse=True)
def _reset() -> Any:
    gate.clear()
    ran.clear()
    while started.acquire(blocking=False):
        pass
    yield
    gate.set()


def one_worker(**kw: Any) -> OperationsCoordinator:
    return OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1, stop_timeout=5, **kw)


def test_overloaded_past_max_pending_and_nothing_lost(run: Any) -> None:
    async def main() -> None:
        async with one_worker(mailbox_size=2, max_pending=3) as c:
            first = blocker("first")
            assert started.acquire(timeout=5)  # the worker is busy with `first`
            queued = [quick(i) for i in range(2 + 3)]  # 2 in the mailbox, 3 pending
            with pytest.raises(Overloaded) as info:
                quick(99)
            assert info.value.weight == "light" and info.value.limit == 3 and info.value.pending == 3
            assert "max_pending" in str(info.value)
            stats = c.stats()
            assert stats["pending"]["light"] == 3 and stats["counts"]["rejected_at_submit"] == 1
            assert stats["counts"]["rejected"] == 1  # counted by its terminal state too
            gate.set()
            assert await first == "first"
            assert await asyncio.gather(*queued) == list(range(5))  # every accepted call ran
            assert "quick99" not in ran

    run(main())


def test_default_max_pending_accepts_a_65536_token_burst(run: Any) -> None:
    @task_token_guard(operation_type="burst", tags={"weight": "light"})
    def burst(i: int) -> int:
        return i

    async def main() -> None:
        async with OperationsCoordinator(policies=[]) as c:
            results = await asyncio.gather(*[burst(i) for i in range(65_536)], return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert failures == []
            assert results == list(range(65_536))
            assert c.stats()["counts"]["completed"] == 65_536

    run(main())


def test_pause_holds_admission_and_resume_releases(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            c.pause()
            tokens = [quick(i) for i in range(3)]
            await asyncio.sleep(0.05)
            assert ran == [] and all(t.state is TokenState.WAITING for t in tokens)
            assert c.paused and c.stats()["counts"]["waiting"] == 3
            c.resume()
            assert await asyncio.gather(*tokens) == [0, 1, 2]

    run(main())


def test_pause_one_operation_does_not_block_others(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            c.pause("quick")
            held = quick(1)
            gate.set()
            assert await blocker("other") == "other"  # a different operation still runs
            assert held.state is TokenState.WAITING and c.stats()["held"] == {"quick": 1}
            c.resume("quick")
            assert await held == 1

    run(main())


def test_pausing_an_operation_also_holds_its_calls_already_pending(run: Any) -> None:
    async def main() -> None:
        async with one_worker(mailbox_size=1) as c:
            running = blocker("r")
            assert started.acquire(timeout=5)
            in_mailbox = quick(0)  # the worker's mailbox (size 1) runs it after `running`
            pending = quick(1)  # waits in the light pending queue for a mailbox
            assert pending.state is TokenState.WAITING and c.stats()["pending_total"] == 1
            # When the operation is paused after its call was queued
            c.pause("quick")
            gate.set()
            assert await running == "r"
            assert await in_mailbox == 0  # calls already in a mailbox still run
            await blocker("after")  # the same worker has passed the pending queue by now
            # Then the pending call waits with the held ones until resume
            assert pending.state is TokenState.WAITING and "quick1" not in ran
            assert c.stats()["held"] == {"quick": 1} and c.stats()["pending_total"] == 0
            c.resume("quick")
            assert await pending == 1

    run(main())


def test_a_paused_operation_holds_at_most_max_pending_calls(run: Any) -> None:
    async def main() -> None:
        async with one_worker(max_pending=3) as c:
            c.pause("quick")
            held = [quick(i) for i in range(3)]
            # Past max_pending a paused operation refuses new calls too, instead of
            # holding an unbounded number of them.
            with pytest.raises(Overloaded) as info:
                quick(99)
            assert info.value.limit == 3 and info.value.pending == 3 and "paused" in str(info.value)
            assert c.stats()["held"] == {"quick": 3} and c.stats()["counts"]["rejected_at_submit"] == 1
            c.resume("quick")
            assert await asyncio.gather(*held) == [0, 1, 2]
            assert "quick99" not in ran

    run(main())


def test_drain_refuses_new_calls_finishes_accepted_and_resume_reopens(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            running = blocker("r")
            queued = quick(1)
            assert started.acquire(timeout=5)
            drain_task = asyncio.ensure_future(c.drain(timeout=10))
            await asyncio.sleep(0.01)
            assert c.draining
            with pytest.raises(GateClosed, match="resume"):
                quick(2)
            gate.set()
            report = await drain_task
            assert report.drained and report.remaining == 0 and report.settled_during_drain == 2
            assert await running == "r" and await queued == 1
            c.resume()
            assert not c.draining and await quick(3) == 3

    run(main())


def test_drain_timeout_reports_remaining_work(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            token = blocker("slow")
            assert started.acquire(timeout=5)
            report = await c.drain(timeout=0.05)
            assert not report.drained and report.remaining == 1
            gate.set()
            assert await token == "slow"

    run(main())


def test_a_drain_does_not_lift_a_pause_and_its_held_calls_run_after_resume(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            # Given a global pause holding one accepted call
            c.pause()
            held = quick(7)
            # When the coordinator drains
            report = await c.drain(timeout=0.05)
            # Then the held call did not run and the report says it is still there
            assert not report.drained and report.remaining == 1
            assert held.state is TokenState.WAITING and "quick7" not in ran
            # And resume() (which reopens the gate and lifts the pause) lets it run
            c.resume()
            assert await held == 7

    run(main())


def test_kill_a_queued_token_and_report_an_executing_one(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            running = blocker("running")
            assert started.acquire(timeout=5)
            queued = quick(1)
            result = c.kill(queued.token_id, reason="operator said so")
            assert result.killed and result.state == "killed"
            with pytest.raises(TokenKilled, match="operator said so"):
                await queued
            executing = c.kill(running.token_id)
            assert not executing.killed and executing.state == "executing"
            assert "cannot be interrupted" in executing.message
            unknown = c.kill("123456789")
            assert not unknown.found
            gate.set()
            assert await running == "running"
            assert "quick1" not in ran  # the killed token never ran
            assert c.stats()["counts"]["killed"] == 1

    run(main())


def test_killed_tokens_left_in_a_mailbox_are_not_counted_as_admitted(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            running = blocker("r")
            assert started.acquire(timeout=5)
            queued = [quick(i) for i in range(3)]  # in the busy worker's mailbox
            assert c.stats()["counts"]["admitted"] == 3
            assert c.kill_operation("quick") == 3
            # The worker skips them when it gets there; until then the stats must not
            # report them twice (as killed and as admitted).
            stats = c.stats()
            counts = stats["counts"]
            assert counts["killed"] == 3 and counts["admitted"] == 0
            assert counts["waiting"] + counts["admitted"] + counts["executing"] == counts["inflight"] == 1
            assert stats["cores"][0]["queue_depth"] == 0 and stats["cores"][0]["workers"][0]["queue_depth"] == 0
            gate.set()
            assert await running == "r"
            await asyncio.gather(*queued, return_exceptions=True)

    run(main())


def test_killed_tokens_left_in_a_pinned_queue_are_not_counted_as_pending(run: Any) -> None:
    class PinToCoreOne(Policy):
        name = "pin_to_core_one"

        def pick_core(self, token: Any) -> int | None:
            return 1 if token.operation_type == "quick" else None

    async def main() -> None:
        async with OperationsCoordinator(policies=[PinToCoreOne()], num_cores=1, workers_per_core=1,
                                         mailbox_size=1, stop_timeout=5) as c:
            running = blocker("r")
            assert started.acquire(timeout=5)
            queued = [quick(i) for i in range(4)]  # 1 in the mailbox, 3 in core 1's pinned queue
            other = blocker("other")  # keeps pending_total above zero (light class queue)
            assert c.stats()["cores"][0]["pinned_pending"] == 3
            assert c.kill_operation("quick") == 4
            stats = c.stats()
            assert stats["cores"][0]["pinned_pending"] == 0 and stats["pending_total"] == 1
            gate.set()
            assert await running == "r" and await other == "other"
            await asyncio.gather(*queued, return_exceptions=True)

    run(main())


def test_kill_all_of_an_operation(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            running = blocker("r")
            assert started.acquire(timeout=5)
            queued = [quick(i) for i in range(5)]
            assert c.kill_operation("quick") == 5
            results = await asyncio.gather(*queued, return_exceptions=True)
            assert all(isinstance(r, TokenKilled) for r in results)
            gate.set()
            await running

    run(main())


def test_timeout_of_a_token_that_never_started_means_it_never_runs(run: Any) -> None:
    @task_token_guard(operation_type="late", tags={"weight": "light", "timeout": 0.05})
    def late() -> str:
        ran.append("late")
        return "late"

    async def main() -> None:
        async with one_worker() as c:
            running = blocker("r")
            assert started.acquire(timeout=5)
            token = late()
            with pytest.raises(TokenTimeout) as info:
                await token
            assert isinstance(info.value, TimeoutError) and not info.value.started
            assert token.state is TokenState.TIMEOUT
            gate.set()
            await running
            await asyncio.sleep(0.02)
            assert "late" not in ran
            assert c.stats()["counts"]["timeout"] == 1

    run(main())


def test_timeout_of_an_executing_token_releases_the_awaiter() -> None:
    entered = threading.Event()

    @task_token_guard(operation_type="slow", tags={"weight": "light", "timeout": NEVER})
    def slow() -> str:
        entered.set()
        gate.wait(10)
        return "finished"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with one_worker() as c:
            token = slow()
            # Once it runs, its timeout passes (on the loop's virtual clock, see tests/virtual_time.py)
            assert await loop.run_in_executor(None, entered.wait, 10)
            loop.advance(NEVER)  # type: ignore[attr-defined]
            with pytest.raises(TokenTimeout) as info:
                await token
            assert info.value.started
            gate.set()
            await quick(0)  # the worker finished the slow call; its late result was discarded
            assert c.stats()["counts"]["late_completions_discarded"] == 1

    run_virtual(main())


def test_run_time_statistics_count_only_calls_that_finished() -> None:
    entered = threading.Event()

    @task_token_guard(operation_type="slow2", tags={"weight": "light", "timeout": NEVER})
    def slow2() -> str:
        entered.set()
        gate.wait(10)
        return "finished"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with one_worker() as c:
            token = slow2()
            assert await loop.run_in_executor(None, entered.wait, 10)
            loop.advance(NEVER)  # type: ignore[attr-defined]
            with pytest.raises(TokenTimeout):
                await token  # started, then settled at its timeout: no run time to report
            stats = c.stats()
            assert stats["queue_wait"]["count"] == 1 and stats["queue_wait"]["window"] == 1
            assert stats["run_time"]["count"] == 0 and stats["run_time"]["window"] == 0
            gate.set()
            assert await quick(0) == 0
            stats = c.stats()
            assert stats["queue_wait"]["count"] == 2 and stats["run_time"]["count"] == 1

    run_virtual(main())


def test_cancelling_the_awaiter_kills_a_token_that_has_not_started(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            running = blocker("r")
            assert started.acquire(timeout=5)
            queued = quick(1)
            waiter = asyncio.ensure_future(queued)
            await asyncio.sleep(0)
            waiter.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert queued.state is TokenState.KILLED
            # asyncio.shield opts out: the shielded token still runs.
            shielded_token = quick(2)
            shielded = asyncio.ensure_future(asyncio.shield(shielded_token))
            await asyncio.sleep(0)
            shielded.cancel()
            gate.set()
            await running
            assert await shielded_token == 2
            assert "quick1" not in ran and c.stats()["counts"]["killed"] == 1

    run(main())


def test_cancelling_the_awaiter_of_an_executing_token_releases_it_at_once(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            token = blocker("r")
            assert started.acquire(timeout=5)
            waiter = asyncio.ensure_future(asyncio.wait_for(token, 0.05))
            with pytest.raises(asyncio.TimeoutError):
                await waiter
            assert token.state is TokenState.EXECUTING  # honest: it is still running
            gate.set()
            await c.drain(timeout=5)
            assert token.state is TokenState.COMPLETED and c.stats()["counts"]["completed"] == 1

    run(main())


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


@task_token_guard(operation_type="ctx")
def read_context() -> str:
    value = request_id.get()
    request_id.set("changed-in-worker")  # must not leak back to the caller or other calls
    return value


def test_each_call_runs_in_a_copy_of_its_callers_context(run: Any) -> None:
    async def handle(rid: str) -> str:
        request_id.set(rid)
        return await read_context()

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=2):
            assert await asyncio.gather(*[handle(f"req-{i}") for i in range(20)]) == [f"req-{i}" for i in range(20)]
            assert request_id.get() == "none"
            assert await read_context() == "none"  # worker threads start from an empty context

    run(main())


def test_calls_from_an_empty_context_stay_isolated_from_each_other() -> None:
    # A caller with no context variables set gets a fresh empty context per
    # run (the copy is not kept): what one call sets must not reach the next
    # call on the same worker thread.
    def main() -> list[str]:
        async def inner() -> list[str]:
            assert len(contextvars.copy_context()) == 0
            async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1):
                return [await read_context() for _ in range(5)]

        return asyncio.run(inner())

    assert contextvars.Context().run(main) == ["none"] * 5


def test_token_kill_method(run: Any) -> None:
    async def main() -> None:
        async with one_worker() as c:
            running = blocker("r")
            assert started.acquire(timeout=5)
            queued = quick(7)
            result = queued.kill("no longer needed")
            assert result.killed and queued.state is TokenState.KILLED
            with pytest.raises(TokenKilled, match="no longer needed"):
                await queued
            assert not running.kill().killed  # executing: cannot be interrupted
            gate.set()
            assert await running == "r"
            assert c.stats()["counts"]["killed"] == 1

    run(main())
