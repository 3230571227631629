"""Core findings of the http flood investigation (issue 17), as regression tests.

Each test pins one behaviour the investigation found in the engine, so a
later change cannot bring it back.
"""

from __future__ import annotations

import asyncio
import threading
import time

from tokengate import OperationsCoordinator, task_token_guard

_gate = threading.Event()


@task_token_guard(operation_type="tests.flood.heavy", tags={"weight": "heavy"})
def _blocked_heavy() -> None:
    _gate.wait(10)  # bounded: the test sets the gate long before


def test_a_reserved_worker_does_not_poll_beside_queues_it_may_not_steal() -> None:
    async def scenario() -> float | None:
        _gate.clear()
        # Given 2 domains x 2 workers: domain 2's worker 0 is reserved for light calls, and 8 blocked
        # heavy calls fill domain 1 and spill onto domain 2's worker 1, queueing behind its running call
        async with OperationsCoordinator(num_cores=2, workers_per_core=2, policies=[],
                                         process_workers=0) as coordinator:
            reserved, sibling = [w for w in coordinator._router.workers if w.core_id == 2]
            tokens = [_blocked_heavy() for _ in range(8)]
            try:
                deadline = time.monotonic() + 10
                while not (sibling.current is not None and sibling.mailbox) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                assert sibling.current is not None and sibling.mailbox, "the heavy calls did not spill onto domain 2"
                assert all(t.weight == "heavy" for t in sibling.mailbox)
                # When the reserved worker asks how long it may park
                return coordinator._steal_wait(reserved)
            finally:
                _gate.set()
                await asyncio.gather(*tokens)

    # Then it may sleep until woken: nothing queued there is a call it may steal
    assert asyncio.run(scenario()) is None
