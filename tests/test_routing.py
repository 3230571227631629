"""Front/back fill, staggered spreading, and the bulkhead reserve, observed on real workers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from tokengate import ConfigurationError, OperationsCoordinator, task_token_guard

gate = threading.Event()


@task_token_guard(operation_type="heavy_block", tags={"weight": "heavy"})
def heavy_block() -> str:
    gate.wait(10)
    return threading.current_thread().name


@task_token_guard(operation_type="light_block", tags={"weight": "light"})
def light_block() -> str:
    gate.wait(10)
    return threading.current_thread().name


@task_token_guard(operation_type="light_quick", tags={"weight": "light"})
def light_quick() -> str:
    return threading.current_thread().name


@task_token_guard(operation_type="medium_quick", tags={"weight": "medium"})
def medium_quick() -> str:
    return threading.current_thread().name


async def _wait_executing(c: OperationsCoordinator, n: int) -> None:
    for _ in range(1000):
        if c.stats()["counts"]["executing"] >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never saw {n} executing: {c.stats()['counts']}")


def test_heavy_fills_front_light_fills_back_and_they_meet_only_under_load(run: Any) -> None:
    gate.clear()

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=4, workers_per_core=2, bulkhead_reserve=1) as c:
            h = [heavy_block() for _ in range(2)]
            lt = [light_block()]
            await _wait_executing(c, 3)
            # Given an idle pool, heavy lands on core 1 and light on the last core.
            assert {t.core_id for t in h} == {1}
            assert {t.core_id for t in lt} == {4}
            # When heavy load grows it spills forward, core by core.
            more = [heavy_block() for _ in range(3)]
            await _wait_executing(c, 6)
            assert [t.core_id for t in more] == [2, 3, 4]
            # On cores it does not own, heavy never takes the reserved worker 0.
            assert all(t.worker_id.endswith("w1") for t in more)
            gate.set()
            await asyncio.gather(*h, *lt, *more)

    run(main())
    gate.set()


def test_bulkhead_reserve_keeps_light_work_flowing_under_a_heavy_flood(run: Any) -> None:
    gate.clear()

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=2, workers_per_core=3, bulkhead_reserve=1) as c:
            flood = [heavy_block() for _ in range(40)]  # far more than heavy may run at once
            await _wait_executing(c, 5)  # 3 on core 1 + 2 of core 2's 3 workers
            await asyncio.sleep(0.02)
            executing = c.stats()["counts"]["executing"]
            assert executing == 5, "heavy must never take core 2's reserved worker"
            # Then a light call still runs at once, on the reserved worker of core 2.
            name = await asyncio.wait_for(light_quick(), 5)
            assert name.endswith("core2-w0")
            assert await asyncio.wait_for(medium_quick(), 5)
            snapshot = c.stats()["cores"]
            reserved = snapshot[1]["workers"][0]
            assert reserved["worker_id"] == "core2-w0" and reserved["running_operation"] is None
            gate.set()
            assert len(await asyncio.gather(*flood)) == 40

    run(main())
    gate.set()


def test_one_core_runs_everything_on_core_one(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=2):
            tokens = [light_quick(), medium_quick(), heavy_block()]
            gate.set()
            await asyncio.gather(*tokens)
            assert {t.core_id for t in tokens} == {1}

    gate.set()
    run(main())


def test_staggered_positions_spread_work_over_a_cores_workers(run: Any) -> None:
    gate.clear()

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=4) as c:
            tokens = [light_block() for _ in range(4)]
            await _wait_executing(c, 4)
            # Each idle worker took one: none doubled up while another sat idle.
            busy = [w for w in c.stats()["cores"][0]["workers"] if w["busy"]]
            assert len(busy) == 4
            gate.set()
            await asyncio.gather(*tokens)

    run(main())
    gate.set()


def test_affinity_counts_match_what_ran(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=3, workers_per_core=2) as c:
            await asyncio.gather(*[light_quick() for _ in range(30)], *[medium_quick() for _ in range(20)])
            cores = {core["core_id"]: core["routed"] for core in c.stats()["cores"]}
            assert cores[1] == {"heavy": 0, "medium": 0, "light": 0}  # light and medium never use core 1
            assert cores[3]["light"] == 30  # with 3 cores light may only use core 3
            assert cores[2]["medium"] + cores[3]["medium"] == 20

    run(main())


@pytest.mark.parametrize("core_id", [True, 0, 3, "1", 1.0])
def test_active_workers_refuse_a_core_that_is_not_one_of_ours(core_id: Any) -> None:
    # Given a coordinator with cores 1 and 2 (not started: the check needs no threads)
    c = OperationsCoordinator(policies=[], num_cores=2, workers_per_core=2)
    # Then a bool, an out-of-range or a non-int core id is a typed error naming the valid cores
    with pytest.raises(ConfigurationError, match=r"unknown core .*cores are the integers 1\.\.2"):
        c.set_active_workers(core_id, 1)
    with pytest.raises(ConfigurationError, match="unknown core"):
        c.active_workers(core_id)


def test_shrinking_a_cores_active_workers_takes_effect(run: Any) -> None:
    gate.clear()

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=4) as c:
            c.set_active_workers(1, 2)
            assert c.active_workers(1) == 2
            tokens = [light_block() for _ in range(4)]
            await _wait_executing(c, 2)
            await asyncio.sleep(0.02)
            assert c.stats()["counts"]["executing"] == 2
            gate.set()
            names = await asyncio.gather(*tokens)
            assert {n.rsplit("-", 1)[-1] for n in names} <= {"w0", "w1"}

    run(main())
    gate.set()


short_gate = threading.Event()


@task_token_guard(operation_type="light_short", tags={"weight": "light"})
def light_short() -> str:
    short_gate.wait(10)
    return threading.current_thread().name


@pytest.mark.parametrize("steal_after", [None, 0.3], ids=["frees-up-after-threshold", "parked-before-threshold"])
def test_idle_worker_takes_tokens_queued_behind_a_stuck_sibling(run: Any, steal_after: float | None) -> None:
    # With the default 5 ms threshold the free worker finds its sibling stuck as
    # soon as it frees up; with 0.3 s it runs its own queue and parks first, and
    # must wake up by itself once the sibling counts as stuck.
    gate.clear()
    short_gate.clear()

    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=2, mailbox_size=8) as c:
            if steal_after is not None:
                c._steal_after = steal_after
            # Given both workers busy, so new tokens queue in both mailboxes,
            stuck = light_block()
            short = light_short()
            await _wait_executing(c, 2)
            queued = [light_quick() for _ in range(6)]
            assert {len(w["queue_depth"] * "x") for w in c.stats()["cores"][0]["workers"]} == {3}
            # when one worker frees up while the other stays stuck,
            short_gate.set()
            await short
            # the free worker takes what was queued behind the stuck one.
            names = await asyncio.wait_for(asyncio.gather(*queued), 5)
            assert stuck.state.value == "executing"
            assert all(n.endswith(short.worker_id or "?") for n in names)
            gate.set()
            await stuck

    run(main())
    gate.set()
    short_gate.set()


def test_token_queued_while_every_worker_parks_is_still_run(run: Any) -> None:
    # The router decides to queue on load figures workers change without its
    # lock: every mailbox may look full when it decides, and be empty, with its
    # worker parked, when the token lands in the pending queue. Replay exactly
    # that: all workers parked, and the router's look says "all full".
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=2) as c:
            router = c._router
            for _ in range(1000):
                if all(w.idle for w in router.workers):
                    break
                await asyncio.sleep(0.005)
            assert all(w.idle for w in router.workers)
            real_choose = router.choose
            router.choose = lambda weight, pin: None  # type: ignore[method-assign]
            try:
                token = light_quick()
                assert token.state.value == "waiting"
            finally:
                router.choose = real_choose  # type: ignore[method-assign]
            assert await asyncio.wait_for(token, 5)

    run(main())


def test_a_worker_parking_beside_a_queue_between_two_calls_looks_again() -> None:
    # Given a sibling with a call queued in its mailbox but between two calls (none running):
    # it is about to start the next one, which may block, and then nothing would wake a
    # worker that parked without a deadline (the sticky test's ordered call waited behind
    # a blocked call for good while its sibling slept, ~1 run in 30 on a loaded host).
    c = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=2, bulkhead_reserve=0, process_workers=0)
    sibling, parker = c._router.workers
    token = type("Queued", (), {"weight": "light", "_where": 0})()  # what stuck_in reads of a queued call
    sibling.mailbox.append(token)  # type: ignore[arg-type]
    assert sibling.current is None and "light" in parker.classes
    # When the other worker asks how long it may park, then it gets a deadline: it looks again.
    wait = c._steal_wait(parker)
    assert wait is not None and 0 < wait <= c._steal_after
