"""Long calls are paced by the loop: settled before their worker takes the next, a few per loop pass.

See ``OperationsCoordinator(pace_after=...)`` and ``SettlementMixin._complete_paced``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tokengate import ConfigurationError, OperationsCoordinator, TaskToken, task_token_guard
from tokengate import _settlement

# Tokens the paced function looks at while it runs (set by each test before its calls).
_seen: dict[str, Any] = {}


@task_token_guard(operation_type="pacing.first", tags={"weight": "light"})
def first() -> str:
    return "first"


@task_token_guard(operation_type="pacing.second", tags={"weight": "light"})
def second() -> bool:
    # Runs on the same (only) worker right after first(): was first() settled by then?
    token: TaskToken[Any] = _seen["first"]
    return token.done()


@task_token_guard(operation_type="pacing.gated", tags={"weight": "light"})
def gated(go: threading.Event, running: list[int]) -> int:
    running.append(1)  # list.append is atomic: a count of calls running
    go.wait(10)
    return 1


@pytest.fixture
def patient_pacing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real bound (0.1 s) lets a worker go on when the loop lags; a loaded CI
    # host must not turn that into a failed assertion here.
    monkeypatch.setattr(_settlement, "PACE_TIMEOUT", 30.0)


def test_a_long_call_is_settled_before_its_worker_starts_the_next(run: Any, patient_pacing: None) -> None:
    async def main() -> None:
        # Every call counts as long (pace_after tiny); one worker runs both calls in order.
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1, bulkhead_reserve=0,
                                         pace_after=1e-9) as c:
            c.pause()  # queue both before either runs, so the worker chains them
            _seen["first"] = a = first()
            b = second()
            c.resume()
            assert await a == "first"
            assert await b is True, "the worker started the next call before the loop settled the long one"

    run(main())


def test_paced_completions_settle_a_few_per_loop_pass(run: Any, patient_pacing: None) -> None:
    async def main() -> None:
        n = 12
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=n, bulkhead_reserve=0,
                                         pace_after=1e-9) as c:
            go = threading.Event()
            running: list[int] = []
            tokens = [gated(go, running) for _ in range(n)]
            deadline = time.monotonic() + 10
            while len(running) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            go.set()
            # Keep the loop busy until every call has ended and waits to be settled.
            deadline = time.monotonic() + 10
            while len(c._done_paced) < n and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(c._done_paced) == n
            # The drain callback was scheduled while the loop was blocked; this
            # one runs right after it, in the same loop pass.
            at_probe: list[int] = []
            asyncio.get_running_loop().call_soon(lambda: at_probe.append(sum(t.done() for t in tokens)))
            assert await asyncio.gather(*tokens) == [1] * n
            assert at_probe and 0 < at_probe[0] < n, f"{at_probe}: the whole wave settled in one loop pass"
            assert at_probe[0] == _settlement.PACED_CHUNK

    run(main())


def test_stop_settles_paced_completions_and_releases_their_workers(run: Any, patient_pacing: None) -> None:
    async def main() -> None:
        n = 6
        c = OperationsCoordinator(policies=[], num_cores=1, workers_per_core=n, bulkhead_reserve=0, pace_after=1e-9)
        go = threading.Event()
        running: list[int] = []
        async with c:
            tokens = [gated(go, running) for _ in range(n)]
            deadline = time.monotonic() + 10
            while len(running) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            go.set()  # and leave at once: stop() finds workers waiting for their calls to settle
        assert not c._done_paced
        assert [t.state.value for t in tokens] == ["completed"] * n
        assert [t.result() for t in tokens] == [1] * n
        assert c.stats()["counts"]["completed"] == n

    run(main())


def test_pace_after_none_never_paces(run: Any) -> None:
    async def main() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=2, pace_after=None) as c:
            assert await asyncio.gather(*[first() for _ in range(20)]) == ["first"] * 20
            assert c._pace_after == float("inf")

    run(main())


@pytest.mark.parametrize("bad", [0, -1, True, "0.02", float("inf"), float("nan")])
def test_pace_after_is_validated_at_construction(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="pace_after"):
        OperationsCoordinator(pace_after=bad)
