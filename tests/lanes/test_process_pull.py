"""The process lane's pull across domains: an idle process takes calls waiting in another domain's mailbox.

Only where routing could have placed the call there in the first place: a class
the process may run (the bulkhead holds), and never a call a policy routes (a
sticky key stays on its pinned domain).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tokengate import OperationsCoordinator, TokenState

from . import lane_functions as lf
from .test_process_lane import _wait_for_file

WAIT = 30.0


def _start(**options: Any) -> OperationsCoordinator:
    coordinator = OperationsCoordinator(num_cores=2, warm_processes=True, stop_timeout=5, **options)
    coordinator.start()
    deadline = time.monotonic() + 60
    while not coordinator.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    assert coordinator.ready
    return coordinator


def _workers(coordinator: OperationsCoordinator) -> dict[tuple[int, int], Any]:
    """The process workers by (domain, index)."""
    return {(core.core_id, w.index): w for core in coordinator._routers["process"].cores.values()
            for w in core.workers}


def _wait_carried(worker: Any, tokens: list[Any], count: int) -> list[Any]:
    """Wait until *worker* has claimed exactly *count* of *tokens* (sent them to its process); return those."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        carried = [t for t in tokens if worker.carries(t)]
        if len(carried) == count:
            return carried
        time.sleep(0.005)
    raise AssertionError(f"{worker.worker_id} did not claim {count} of the calls within {WAIT}s")


def _on_loop(coordinator: OperationsCoordinator, submit: Callable[[], list[Any]]) -> list[Any]:
    """Submit calls in one callback on the coordinator's loop: the workers look at their mailboxes once all are in."""
    async def run() -> list[Any]:
        return submit()

    loop = coordinator._loop
    assert loop is not None
    return asyncio.run_coroutine_threadsafe(run(), loop).result(WAIT)


def _hold_both(tmp_path: Path) -> tuple[Path, Path, Any, int, Any, int]:
    """Hold both processes busy, each until its go-file is written: (go_a, go_b, holder_a, pid_a, holder_b, pid_b)."""
    go_a, go_b = tmp_path / "go_a", tmp_path / "go_b"
    holder_a = lf.hold_heavy(str(tmp_path / "a"), str(go_a), 60.0)
    pid_a = _wait_for_file(tmp_path / "a")
    holder_b = lf.hold_heavy(str(tmp_path / "b"), str(go_b), 60.0)
    pid_b = _wait_for_file(tmp_path / "b")
    return go_a, go_b, holder_a, pid_a, holder_b, pid_b


@pytest.fixture()
def two_domains() -> Iterator[OperationsCoordinator]:
    # One process per domain; heavy calls may use both.
    coordinator = _start(policies=[], process_workers=2, name="lanepull")
    yield coordinator
    coordinator.stop()


def test_an_idle_process_pulls_the_calls_waiting_in_another_domains_mailbox(
        two_domains: OperationsCoordinator, tmp_path: Path) -> None:
    # Given both processes held busy, and six calls placed three per domain when they were submitted
    workers = _workers(two_domains)
    go_a, go_b, holder_a, pid_a, holder_b, pid_b = _hold_both(tmp_path)
    assert pid_a != pid_b
    calls = _on_loop(two_domains, lambda: [lf.pid_heavy(i) for i in range(6)])
    assert [t.core_id for t in calls] == [1, 2] * 3
    # (a slow or unmeasured function: each process is sent one call behind its running one)
    behind_a = _wait_carried(workers[(1, 0)], calls, 1)
    # When domain 2's process is let go
    go_b.write_text("go")
    assert holder_b.get(timeout=WAIT) == pid_b
    # Then it runs its own calls and the two waiting in domain 1's mailbox, while domain 1's process still holds;
    for t in calls:
        if t is not behind_a[0]:
            assert t.get(timeout=WAIT) == pid_b
    assert holder_a.state is TokenState.EXECUTING and behind_a[0].state is TokenState.EXECUTING
    assert workers[(2, 0)].stolen == 2 and workers[(1, 0)].stolen == 0
    rows = [w for core in two_domains.stats()["lanes"]["process"]["cores"] for w in core["workers"]]
    assert sorted(w["stolen"] for w in rows) == [0, 2]
    # and the call already sent to domain 1's process runs there, once it is let go
    go_a.write_text("go")
    assert holder_a.get(timeout=WAIT) == pid_a
    assert behind_a[0].get(timeout=WAIT) == pid_a


def test_a_sticky_call_is_never_pulled_away_from_its_pinned_domain(tmp_path: Path) -> None:
    coordinator = _start(process_workers=2, name="lanepullsticky")  # default policies: sticky routes
    try:
        workers = _workers(coordinator)
        # Given both processes held busy, and four calls of one sticky key pinned to domain 1
        go_a, go_b = tmp_path / "go_a", tmp_path / "go_b"
        holder_a = lf.hold_heavy(str(tmp_path / "a"), str(go_a), 60.0)
        pid_a = _wait_for_file(tmp_path / "a")
        holder_b = lf.hold_heavy(str(tmp_path / "b"), str(go_b), 60.0)
        pid_b = _wait_for_file(tmp_path / "b")
        keyed = _on_loop(coordinator, lambda: [lf.sticky_pid(7, i) for i in range(4)])
        assert {t.core_id for t in keyed} == {1}
        _wait_carried(workers[(1, 0)], keyed, 1)
        # When domain 2's process is let go and runs another call (each reply has it look for work)
        go_b.write_text("go")
        assert holder_b.get(timeout=WAIT) == pid_b
        assert lf.pid_heavy(0).get(timeout=WAIT) == pid_b
        # Then the keyed calls still wait for their own domain's process,
        assert all(t.state in (TokenState.ADMITTED, TokenState.EXECUTING) for t in keyed)
        assert workers[(2, 0)].stolen == 0
        # and all run there
        go_a.write_text("go")
        assert holder_a.get(timeout=WAIT) == pid_a
        assert [t.get(timeout=WAIT) for t in keyed] == [pid_a] * 4
    finally:
        coordinator.stop()


def test_a_process_the_bulkhead_reserves_for_light_calls_never_pulls_a_heavy_call(tmp_path: Path) -> None:
    # Two processes per domain, bulkhead_reserve=1: domain 2's first process takes light and medium calls only
    coordinator = _start(policies=[], process_workers=4, bulkhead_reserve=1, name="lanepullbulkhead")
    try:
        workers = _workers(coordinator)
        assert "heavy" not in workers[(2, 0)].classes and "light" in workers[(2, 0)].classes
        # Given every process that may run heavy calls held busy, and heavy calls queued behind them
        gos = [tmp_path / f"go{i}" for i in range(3)]
        holders = []
        for i, go in enumerate(gos):
            holders.append(lf.hold_heavy(str(tmp_path / f"m{i}"), str(go), 60.0))
            _wait_for_file(tmp_path / f"m{i}")
        heavy = _on_loop(coordinator, lambda: [lf.pid_heavy(i) for i in range(9)])
        for key in ((1, 0), (1, 1), (2, 1)):
            _wait_carried(workers[key], heavy, 1)
        # When light calls run one after another on the reserved process (each reply has it look for work)
        light_pids = {lf.worker_pid().get(timeout=WAIT) for _ in range(5)}
        # Then it took none of the heavy calls, which wait for the processes that may run them
        assert workers[(2, 0)].stolen == 0
        assert all(t.state in (TokenState.ADMITTED, TokenState.EXECUTING) for t in heavy)
        for go in gos:
            go.write_text("go")
        heavy_pids = {t.get(timeout=WAIT) for t in heavy}
        assert not heavy_pids & light_pids
    finally:
        coordinator.stop()


def test_the_last_call_waiting_is_not_sent_ahead_to_a_busy_process(
        two_domains: OperationsCoordinator, tmp_path: Path) -> None:
    # Given both processes held busy, and one more call, placed on domain 1 when it was submitted
    workers = _workers(two_domains)
    go_a, go_b, holder_a, pid_a, holder_b, pid_b = _hold_both(tmp_path)
    [last] = _on_loop(two_domains, lambda: [lf.pid_heavy(0)])
    assert last.core_id == 1
    _on_loop(two_domains, list)  # a loop round later: domain 1's worker has looked at its mailbox
    # Then domain 1 keeps it in its mailbox rather than send it behind its running call,
    assert not workers[(1, 0)].carries(last) and last.state is TokenState.ADMITTED
    # and when domain 2's process frees first, it takes it
    go_b.write_text("go")
    assert holder_b.get(timeout=WAIT) == pid_b
    assert last.get(timeout=WAIT) == pid_b
    assert holder_a.state is TokenState.EXECUTING
    go_a.write_text("go")
    assert holder_a.get(timeout=WAIT) == pid_a
