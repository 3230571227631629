"""The recent past as time series: ``SeriesRecorder`` and ``GET /history/series``.

Points are taken with explicit ``sample()`` calls and fake clocks (no sleeps);
the few tests of the sampling task wait for its points with bounded polling
and assert nothing about timing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
from fastapi import APIRouter, FastAPI

from tokengate import (GateClosed, OperationBlocked, OperationsCoordinator, Overloaded, TokenKilled, TokenQuarantined,
                       TokenTimeout, task_token_guard)
from tokengate.errors import ConfigurationError
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.policies.reputation import ReputationPolicy
from tokengate_fastapi import admin_router
from tokengate_fastapi._series import MAX_POINTS, REFUSAL_KINDS, SeriesRecorder, SeriesRecorders, check_series_options

P = "/tokengate"
SERIES = f"{P}/history/series"

pytestmark = pytest.mark.anyio

#: Set by the blocking functions when they start; released by the test's gate.
_started: dict[str, threading.Event] = {}
_release = threading.Event()


@pytest.fixture(autouse=True)
def _release_blocked_workers() -> Iterator[None]:
    _release.clear()
    _started.clear()
    yield
    _release.set()  # no worker stays blocked after a test


def _block(name: str) -> None:
    _started.setdefault(name, threading.Event()).set()
    assert _release.wait(10), "the test never released its workers"


@task_token_guard(operation_type="series.light", tags={"weight": "light"})
def light(x: int) -> int:
    return x


@task_token_guard(operation_type="series.heavy", tags={"weight": "heavy"})
def heavy(x: int) -> int:
    return x


@task_token_guard(operation_type="series.block_light", tags={"weight": "light"})
def block_light(name: str) -> str:
    _block(name)
    return name


@task_token_guard(operation_type="series.block_heavy", tags={"weight": "heavy"})
def block_heavy(name: str) -> str:
    _block(name)
    return name


@task_token_guard(operation_type="series.slow_light", tags={"weight": "light", "timeout": 0.05})
def slow_light(x: int) -> int:
    return x


class FakeClock:
    """A monotonic clock and a wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _recorder(coordinator: Any, clock: FakeClock, *, interval: float = 1.0, window: float = 60.0) -> SeriesRecorder:
    recorder = SeriesRecorder(coordinator, interval=interval, window=window, clock=clock.monotonic, wall=clock.wall)
    assert recorder.sample() is False  # the first sample is the baseline
    return recorder


async def _started_event(name: str) -> None:
    event = _started.setdefault(name, threading.Event())
    assert await asyncio.to_thread(event.wait, 10), f"{name} never started"


def _last(snapshot: dict[str, Any], *path: str) -> Any:
    value: Any = snapshot
    for key in path:
        value = value[key]
    return value[-1]


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "window", "message"), [
    (0, 300, "between"), (0.01, 300, "between"), (3601, 7200, "between"), (True, 300, "finite number"),
    ("1", 300, "finite number"), (float("nan"), 300, "finite number"), (1, float("inf"), "finite number"),
    (1, 0.5, "at least one series_interval"), (0.05, MAX_POINTS * 0.05 + 1, "points"),
])
def test_bad_series_options_are_refused_naming_the_option(interval: Any, window: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_series_options(interval, window)
    with pytest.raises(ConfigurationError, match="series_"):
        admin_router(token="t" * 32, series_interval=interval, series_window=window)


def test_good_options_give_the_capacity() -> None:
    assert check_series_options(1, 300) == (1.0, 300.0)
    assert check_series_options(0.05, MAX_POINTS * 0.05) == (0.05, MAX_POINTS * 0.05)
    assert SeriesRecorders(2.0, 5.0).window == 5.0


# -- what a point holds (real coordinator, explicit samples, fake clock) ------------------------------


async def test_throughput_by_weight_class_and_percentiles_of_the_interval() -> None:
    clock = FakeClock()
    async with OperationsCoordinator(num_cores=2, workers_per_core=2, policies=[], process_workers=0) as c:
        recorder = _recorder(c, clock)
        # Given: 30 light and 10 heavy calls settled during a 2-second interval
        await asyncio.gather(*(light(i) for i in range(30)), *(heavy(i) for i in range(10)))
        clock.advance(2.0)
        assert recorder.sample() is True
        # And: an interval in which nothing happened
        clock.advance(1.0)
        recorder.sample()
        snap = recorder.snapshot()
    # Then: rates per second over each interval, split by class
    assert snap["seq"] == [0, 1]
    assert snap["throughput"] == [20.0, 0.0]
    assert snap["throughput_by_weight"] == {"heavy": [5.0, 0.0], "medium": [0.0, 0.0], "light": [15.0, 0.0]}
    # the percentiles are of the interval's calls: none in the idle interval
    for series in ("queue_wait", "run_time"):
        p50, p99 = snap[series]["p50"], snap[series]["p99"]
        assert p50[0] is not None and p99[0] is not None and 0 <= p50[0] <= p99[0]
        assert p50[1] is None and p99[1] is None
    assert snap["t"] == [round(clock.wall() - 1.0, 3), round(clock.wall(), 3)]
    assert snap["interval"] == 1.0 and snap["window"] == 60.0 and snap["capacity"] == 60


async def test_pending_per_class_busy_workers_per_domain_and_refusals_by_kind() -> None:
    clock = FakeClock()
    reputation = ReputationPolicy()
    quarantine = QuarantinePolicy(":memory:")
    async with OperationsCoordinator(num_cores=2, workers_per_core=1, mailbox_size=1, max_pending=2,
                                     policies=[reputation, quarantine], process_workers=0) as c:
        assert await heavy(0) == 0  # the reputation policy counts blocks of operations it has seen
        recorder = _recorder(c, clock)
        # Given: domain 1's worker busy with a heavy call, domain 2's with a light one
        running = [block_heavy("h"), block_light("l")]
        await _started_event("h")
        await _started_event("l")
        # a light call in domain 2's mailbox, two more pending (max_pending=2), the next one refused
        queued = [light(1), light(2), slow_light(3)]
        with pytest.raises(Overloaded):
            light(4)
        clock.advance(0.5)
        recorder.sample()
        # Next interval: one pending call killed, and one times out while it waits (the awaits are the events)
        assert c.kill(queued[1].token_id).killed
        with pytest.raises(TokenKilled):
            await queued[1]
        with pytest.raises(TokenTimeout):
            await queued[2]
        # a blocked operation, and a call put in quarantine
        reputation.block("series.heavy")
        with pytest.raises(OperationBlocked):
            heavy(5)
        quarantine.hold("series.light")
        with pytest.raises(TokenQuarantined):
            light(6)
        clock.advance(0.5)
        recorder.sample()
        snap = recorder.snapshot()
        _release.set()
        assert await asyncio.gather(*running, queued[0]) == ["h", "l", 1]
    # Then: each point shows the queues and the busy workers at its sample, and each refusal per second
    assert snap["pending"] == {"heavy": [0, 0], "medium": [0, 0], "light": [2, 0]}
    assert snap["busy_workers"] == {"1": [1, 1], "2": [1, 1]}
    assert snap["workers"] == {"1": 1, "2": 1}
    assert snap["refusals"] == {"overloaded": [2.0, 0.0], "blocked": [0.0, 2.0], "closed": [0.0, 0.0],
                                "quarantined": [0.0, 2.0], "killed": [0.0, 2.0], "timed_out": [0.0, 2.0]}
    assert snap["draining"] == [False, False] and snap["paused"] == [False, False]


async def test_draining_and_paused_are_marked_and_throughput_falls_to_zero() -> None:
    clock = FakeClock()
    async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[], process_workers=0) as c:
        recorder = _recorder(c, clock)
        await asyncio.gather(*(light(i) for i in range(10)))
        clock.advance(1.0)
        recorder.sample()
        # When: the gate closes (a drain) and new calls are refused
        await c.drain(timeout=5)
        for i in range(3):
            with pytest.raises(GateClosed):
                light(i)
        clock.advance(1.0)
        recorder.sample()
        c.resume()
        c.pause()
        clock.advance(1.0)
        recorder.sample()
        c.resume()
        snap = recorder.snapshot()
    assert snap["throughput"] == [10.0, 0.0, 0.0]
    assert snap["draining"] == [False, True, False]
    assert snap["paused"] == [False, False, True]


async def test_calls_refused_during_a_drain_are_counted_as_closed_refusals() -> None:
    clock = FakeClock()
    async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[], process_workers=0) as c:
        await c.drain(timeout=5)
        recorder = _recorder(c, clock)
        for i in range(3):
            with pytest.raises(GateClosed):
                light(i)
        clock.advance(1.0)
        recorder.sample()
        c.resume()
        assert _last(recorder.snapshot(), "refusals", "closed") == 3.0


# -- the arithmetic, against a scripted coordinator --------------------------------------------------


class _Record:
    def __init__(self, weight: str, queue_wait: float | None, run_time: float | None) -> None:
        self.weight, self.queue_wait, self.run_time = weight, queue_wait, run_time


class ScriptedCoordinator:
    """Exactly what SeriesRecorder reads: stats(), history(), num_cores, name, running."""

    name = "scripted"
    num_cores = 2
    running = True

    def __init__(self) -> None:
        self.counts = {"settled": 0, "rejected": 0, "quarantined": 0, "killed": 0, "timeout": 0}
        self.blocked_by_op: dict[str, int] = {}
        self.draining = False
        self.records: list[_Record] = []  # newest last
        self.history_limits: list[int] = []
        self.fail = False

    def stats(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("stats broke")
        core = {"pending": {"heavy": 0, "medium": 0, "light": 0}}
        return {
            "phase": "running", "draining": self.draining, "paused": False, "counts": dict(self.counts),
            "pending": {"heavy": 1, "medium": 2, "light": 3},
            "cores": [{"core_id": 1, "busy_workers": 1, "active_workers": 4},
                      {"core_id": 2, "busy_workers": 0, "active_workers": 4}],
            "lanes": {"process": {**core, "pending": {"heavy": 10, "medium": 0, "light": 0},
                                  "cores": [{"core_id": 1, "busy_workers": 2, "active_workers": 2}]}},
            "policies": {"reputation": {"operations": {
                op: {"refused_while_blocked": n} for op, n in self.blocked_by_op.items()}}},
        }

    def history(self, limit: int) -> list[_Record]:
        self.history_limits.append(limit)
        return list(reversed(self.records[-limit:]))

    def settle(self, weight: str, n: int) -> None:
        self.counts["settled"] += n
        self.records += [_Record(weight, 0.001 * (i + 1), 0.002) for i in range(n)]


def test_lanes_are_summed_per_class_and_per_domain() -> None:
    clock = FakeClock()
    fake = ScriptedCoordinator()
    recorder = _recorder(fake, clock)
    clock.advance(1.0)
    recorder.sample()
    snap = recorder.snapshot()
    assert {w: snap["pending"][w] for w in ("heavy", "medium", "light")} == {"heavy": [11], "medium": [2],
                                                                            "light": [3]}
    assert snap["busy_workers"] == {"1": [3], "2": [0]}
    assert snap["workers"] == {"1": 6, "2": 4}


def test_percentiles_are_nearest_rank_over_the_interval_s_calls() -> None:
    clock = FakeClock()
    fake = ScriptedCoordinator()
    recorder = _recorder(fake, clock)
    fake.settle("light", 100)  # queue waits 1..100 ms
    clock.advance(1.0)
    recorder.sample()
    snap = recorder.snapshot()
    assert snap["queue_wait"]["p50"] == [pytest.approx(0.050)]
    assert snap["queue_wait"]["p99"] == [pytest.approx(0.099)]
    assert snap["run_time"] == {"p50": [0.002], "p99": [0.002]}


def test_a_busy_interval_reads_a_bounded_sample_of_the_history_and_scales_the_class_shares() -> None:
    clock = FakeClock()
    fake = ScriptedCoordinator()
    recorder = _recorder(fake, clock)
    # Given: 10,000 calls settled in one interval, the most recent 4,000 of them heavy
    fake.settle("light", 6000)
    fake.settle("heavy", 4000)
    clock.advance(2.0)
    recorder.sample()
    snap = recorder.snapshot()
    # Then: one bounded read of the newest records; the total is exact, the split is their shares
    assert fake.history_limits == [512]
    assert snap["throughput"] == [5000.0]
    assert snap["throughput_by_weight"] == {"heavy": [5000.0], "medium": [0.0], "light": [0.0]}


def test_rejections_split_into_blocked_overloaded_and_closed_and_never_go_negative() -> None:
    clock = FakeClock()
    fake = ScriptedCoordinator()
    recorder = _recorder(fake, clock)
    # an interval with 5 rejections, 2 of them blocks
    fake.counts["rejected"] += 5
    fake.blocked_by_op["op"] = 2
    clock.advance(1.0)
    recorder.sample()
    # the gate closes: the interval that saw it close still counts rejections as overloaded
    fake.draining = True
    fake.counts["rejected"] += 1
    clock.advance(1.0)
    recorder.sample()
    # closed through a whole interval: its rejections are the closed gate's
    fake.counts["rejected"] += 4
    clock.advance(1.0)
    recorder.sample()
    # a reputation row evicted (its count leaves the total): no negative refusals
    fake.draining = False
    fake.blocked_by_op.clear()
    clock.advance(1.0)
    recorder.sample()
    refusals = recorder.snapshot()["refusals"]
    assert refusals["overloaded"] == [3.0, 1.0, 0.0, 0.0]
    assert refusals["blocked"] == [2.0, 0.0, 0.0, 0.0]
    assert refusals["closed"] == [0.0, 0.0, 4.0, 0.0]


def test_the_ring_keeps_the_window_and_drops_the_oldest_points() -> None:
    clock = FakeClock()
    fake = ScriptedCoordinator()
    recorder = _recorder(fake, clock, interval=0.5, window=5.0)
    assert recorder.capacity == 10
    for _ in range(25):
        clock.advance(0.5)
        recorder.sample()
    snap = recorder.snapshot()
    assert recorder.points == 10 and snap["seq"] == list(range(15, 25))
    # every column has one value per point
    columns = [snap["t"], snap["throughput"], snap["draining"], snap["paused"],
               *snap["throughput_by_weight"].values(), *snap["queue_wait"].values(), *snap["run_time"].values(),
               *snap["pending"].values(), *snap["busy_workers"].values(), *snap["refusals"].values()]
    assert all(len(column) == 10 for column in columns)
    # incremental reads
    assert recorder.snapshot(after=22)["seq"] == [23, 24]
    assert recorder.snapshot(after=24)["seq"] == []


def test_a_failing_sample_leaves_a_gap_and_is_logged_once_per_streak(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    fake = ScriptedCoordinator()
    recorder = _recorder(fake, clock)
    fake.fail = True
    with caplog.at_level(logging.WARNING, logger="tokengate_fastapi._series"):
        for _ in range(3):
            clock.advance(1.0)
            assert recorder.sample() is False
        fake.fail = False
        clock.advance(1.0)
        assert recorder.sample() is True
    assert recorder.points == 1
    # the point after the gap covers the whole time since the last good sample
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert "works again" in caplog.records[1].getMessage()


# -- the route and the sampler's life ------------------------------------------------------------------


async def _wait_points(client: Any, auth: dict[str, str], at_least: int) -> dict[str, Any]:
    for _ in range(400):  # bounded: about 20 s
        body: dict[str, Any] = (await client.get(SERIES, headers=auth)).json()
        if len(body["seq"]) >= at_least:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} points after polling: {body['seq']}")


async def test_the_sampler_starts_with_the_app_and_stops_at_shutdown(make_app: Callable[..., FastAPI],
                                                                     serve: Callable[..., Any],
                                                                     auth: dict[str, str]) -> None:
    app = make_app(router={"series_interval": 0.05, "series_window": 1.0})
    async with serve(app) as client:
        coordinator = app.state.tokengate
        tasks = [t for t in asyncio.all_tasks() if t.get_name() == f"tokengate-series:{coordinator.name}"]
        assert len(tasks) == 1  # running before anyone asked
        await asyncio.gather(*(light(i) for i in range(20)))
        body = await _wait_points(client, auth, 3)
        assert body["interval"] == 0.05 and body["capacity"] == 20
        assert sum(body["throughput"]) > 0
        newer = (await client.get(SERIES, params={"after": body["seq"][-1]}, headers=auth)).json()
        assert all(seq > body["seq"][-1] for seq in newer["seq"])
        assert newer["started_at"] == body["started_at"]
    assert tasks[0].done()


async def test_the_first_request_starts_a_sampler_the_lifespan_did_not(serve: Callable[..., Any],
                                                                       auth: dict[str, str], admin_token: str) -> None:
    # Given: a router included in another router, whose lifespan the app merges too, and an app whose own
    # lifespan sets no app.state.tokengate (the coordinator is only in the lifespan state)
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[], process_workers=0) as c:
            yield {"tokengate": c}

    app = FastAPI(lifespan=lifespan)
    outer = APIRouter()
    outer.include_router(admin_router(token=admin_token, series_interval=0.05, series_window=1.0))
    app.include_router(outer, prefix=P)
    async with serve(app) as client:
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("tokengate-series:")]
        first = (await client.get(SERIES, headers=auth)).json()
        assert first["seq"] == []
        assert (await _wait_points(client, auth, 2))["started_at"] == first["started_at"]


async def test_the_route_is_authenticated_validated_and_documented(make_app: Callable[..., FastAPI],
                                                                   serve: Callable[..., Any],
                                                                   auth: dict[str, str]) -> None:
    app = make_app()
    async with serve(app) as client:
        assert (await client.get(SERIES)).status_code == 401
        assert (await client.get(SERIES, headers={"Authorization": "Bearer wrong"})).status_code == 401
        bad = await client.get(SERIES, params={"after": "-2"}, headers=auth)
        assert bad.status_code == 422
        assert (await client.get(SERIES, params={"after": "x"}, headers=auth)).status_code == 422
        ok = await client.get(SERIES, params={"after": -1}, headers=auth)
        assert ok.status_code == 200 and ok.json()["window"] == 300.0
    schema = app.openapi()
    route = schema["paths"][SERIES]["get"]
    assert route["security"] == [{"TokengateAdminToken": []}]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SeriesResponse")
    assert {"401", "422", "503"} <= set(route["responses"])
    assert [p["name"] for p in route["parameters"]] == ["after"]
    components = schema["components"]["schemas"]
    assert set(components["SeriesRefusals"]["properties"]) == set(REFUSAL_KINDS)
    assert {"throughput_by_weight", "queue_wait", "run_time", "pending", "busy_workers", "refusals"} <= set(
        components["SeriesResponse"]["properties"])


async def test_the_sampler_takes_a_last_sample_and_ends_when_the_coordinator_stops() -> None:
    async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[], process_workers=0) as c:
        recorder = SeriesRecorder(c, interval=0.05, window=1.0)
        recorder.start()
        recorder.start()  # idempotent
        await asyncio.gather(*(light(i) for i in range(5)))
        for _ in range(400):  # bounded: about 20 s
            if recorder.points >= 2:
                break
            await asyncio.sleep(0.05)
        assert recorder.running
    # the coordinator stopped: the task sees it at its next tick and ends
    for _ in range(400):
        if not recorder.running:
            break
        await asyncio.sleep(0.05)
    assert not recorder.running and recorder.closed
    assert math.isfinite(recorder.snapshot()["throughput"][-1])
