"""Server-side time series of a coordinator: what the dashboard's charts and ``GET /history/series`` show.

A :class:`SeriesRecorder` samples ``coordinator.stats()`` every ``interval``
seconds (default 1) into a ring buffer holding ``window`` seconds (default
300: five minutes) of points, so a page opened late still sees the recent
past and memory stays bounded (``capacity = ceil(window / interval)`` points,
at most :data:`MAX_POINTS`). Each point covers the interval since the one
before it:

* ``throughput`` — calls settled per second (any outcome), and
  ``throughput_by_weight`` split by weight class (the class shares of the
  interval's calls in the execution history, scaled to the settled count);
* ``queue_wait`` / ``run_time`` — p50 and p99 of the calls settled in the
  interval (the most recent :data:`HISTORY_READ` of them, and at most the
  coordinator's ``history_size``); ``None`` when none was;
* ``pending`` — calls waiting per weight class, all lanes, at the sample;
* ``busy_workers`` — workers running a call per domain (core id), all lanes,
  at the sample;
* ``refusals`` — per second, by kind: ``overloaded`` (refused by admission:
  ``Overloaded`` and any other ``Rejected`` that is not a block),
  ``blocked`` (a reputation block, when that policy is installed), ``closed``
  (rejected while the gate stayed closed from one sample to the next: a
  drain), ``quarantined``, ``killed`` and ``timed_out``;
* ``draining`` / ``paused`` — the gate and the global pause at the sample.

One recorder per coordinator and admin router, run by a task on the server's
loop (:class:`SeriesRecorders`): started with the app (the admin router's
lifespan, merged into the app's by ``include_router``) or, when the router's
lifespan did not see a coordinator, by the first ``/history/series`` request.
It ends after one last sample when the coordinator stops, or at shutdown.
Sampling never touches the hot path: it reads the same snapshot ``/stats``
does, once per interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import weakref
from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, NamedTuple, Sequence

from starlette.types import ASGIApp

from tokengate import OperationsCoordinator
from tokengate.errors import ConfigurationError

from .dependencies import STATE_KEY

__all__ = ["SeriesRecorder", "SeriesRecorders", "check_series_options", "WEIGHTS", "REFUSAL_KINDS",
           "DEFAULT_INTERVAL", "DEFAULT_WINDOW", "MAX_POINTS", "MIN_INTERVAL"]

logger = logging.getLogger(__name__)

WEIGHTS = ("heavy", "medium", "light")
#: The refusal kinds of a point, in the order the dashboard draws them.
REFUSAL_KINDS = ("overloaded", "blocked", "closed", "quarantined", "killed", "timed_out")
DEFAULT_INTERVAL = 1.0
DEFAULT_WINDOW = 300.0
#: Shortest sampling interval: each sample builds a full stats() snapshot.
MIN_INTERVAL = 0.05
#: Most points one recorder keeps (about 400 bytes each): the memory bound of a long window.
MAX_POINTS = 20_000
#: Most execution records read per sample (the interval's most recent calls): the percentiles and class shares.
HISTORY_READ = 512


def check_series_options(interval: object, window: object) -> tuple[float, float]:
    """Validate a sampling *interval* and a *window* (seconds); return them as floats.

    Raises:
        ConfigurationError: for a non-number, a non-finite value, an interval
            outside [MIN_INTERVAL, 3600], a window shorter than one interval,
            or more than :data:`MAX_POINTS` points (window / interval).
    """
    for name, value in (("series_interval", interval), ("series_window", window)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigurationError(f"{name} must be a finite number of seconds, got {value!r}")
    assert isinstance(interval, (int, float)) and isinstance(window, (int, float))
    if not MIN_INTERVAL <= interval <= 3600:
        raise ConfigurationError(
            f"series_interval must be between {MIN_INTERVAL} and 3600 seconds, got {interval!r}")
    if window < interval:
        raise ConfigurationError(
            f"series_window ({window!r} s) must hold at least one series_interval ({interval!r} s)")
    points = math.ceil(window / interval)
    if points > MAX_POINTS:
        raise ConfigurationError(
            f"series_window / series_interval is {points:,} points, more than {MAX_POINTS:,}: shorten the "
            f"window or lengthen the interval (e.g. series_interval={window / MAX_POINTS:.3g})")
    return float(interval), float(window)


class _Totals(NamedTuple):
    """The cumulative counters a point is the difference of."""

    at: float  # monotonic clock
    settled: int
    rejected: int
    blocked: int
    quarantined: int
    killed: int
    timeout: int
    closed: bool  # the gate was closed (draining or not running)


class _Point(NamedTuple):
    seq: int
    t: float  # wall clock, end of the interval
    throughput: float
    by_weight: tuple[float, float, float] | None
    queue_wait: tuple[float, float] | None
    run_time: tuple[float, float] | None
    pending: tuple[int, int, int]
    busy: dict[int, int]
    refusals: tuple[float, ...]
    draining: bool
    paused: bool


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _blocked_total(stats: Mapping[str, Any]) -> int:
    policies = stats.get("policies")
    reputation = policies.get("reputation") if isinstance(policies, Mapping) else None
    operations = reputation.get("operations") if isinstance(reputation, Mapping) else None
    if not isinstance(operations, Mapping):
        return 0
    return sum(_int(row.get("refused_while_blocked")) for row in operations.values() if isinstance(row, Mapping))


def _all_cores(stats: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    yield from stats.get("cores") or ()
    lanes = stats.get("lanes")
    if isinstance(lanes, Mapping):
        for lane in lanes.values():
            if isinstance(lane, Mapping):
                yield from lane.get("cores") or ()


def _percentiles(values: list[float]) -> tuple[float, float] | None:
    """Nearest-rank p50 and p99 of *values* (None when empty)."""
    if not values:
        return None
    values.sort()
    n = len(values)
    return values[max(0, math.ceil(0.5 * n) - 1)], values[max(0, math.ceil(0.99 * n) - 1)]


class SeriesRecorder:
    """A bounded ring of points sampled from one coordinator's ``stats()``.

    :meth:`sample` records one point (the first call only takes the
    baseline); :meth:`start` runs it every *interval* seconds on the running
    loop until the coordinator stops or :meth:`stop` is called;
    :meth:`snapshot` returns the window as columns. Thread: the server's
    event loop (the loop the coordinator settles on when attached, so a
    sample's counters and history agree).
    """

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        *,
        interval: float = DEFAULT_INTERVAL,
        window: float = DEFAULT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """Build an idle recorder; raises ConfigurationError for bad *interval* / *window* (see check_series_options)."""
        self.interval, self.window = check_series_options(interval, window)
        self.capacity = math.ceil(self.window / self.interval)
        self.coordinator = coordinator
        self.started_at = wall()
        self._clock = clock
        self._wall = wall
        self._points: deque[_Point] = deque(maxlen=self.capacity)
        self._last: _Totals | None = None
        self._seq = 0
        self._failing = False
        self._active: dict[int, int] = {}  # active workers per domain at the last sample (the busy chart's scale)
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    # -- sampling ------------------------------------------------------------------------------

    def sample(self) -> bool:
        """Read the coordinator once; record a point (True) or only the baseline (False, the first time).

        A failing ``stats()`` records nothing (a gap in the charts) and is
        logged once per failing streak.
        """
        try:
            stats = self.coordinator.stats()
            totals, point_parts = self._read(stats)
        except Exception:
            if not self._failing:
                logger.exception("tokengate series: could not sample coordinator %r; the charts show a gap "
                                 "until a sample succeeds", self.coordinator.name)
            self._failing = True
            return False
        if self._failing:
            logger.warning("tokengate series: sampling coordinator %r works again", self.coordinator.name)
            self._failing = False
        last, self._last = self._last, totals
        if last is None:
            return False
        self._points.append(self._point(last, totals, *point_parts))
        return True

    def _read(self, stats: Mapping[str, Any]) -> tuple[_Totals, tuple[Any, ...]]:
        counts = stats["counts"]
        closed = bool(stats.get("draining")) or stats.get("phase") != "running"
        totals = _Totals(self._clock(), _int(counts.get("settled")), _int(counts.get("rejected")),
                         _blocked_total(stats), _int(counts.get("quarantined")), _int(counts.get("killed")),
                         _int(counts.get("timeout")), closed)
        pending = [0, 0, 0]
        busy: dict[int, int] = {}
        lanes = stats.get("lanes")
        for source in (stats, *(lanes.values() if isinstance(lanes, Mapping) else ())):
            by_class = source.get("pending") if isinstance(source, Mapping) else None
            if isinstance(by_class, Mapping):
                for i, w in enumerate(WEIGHTS):
                    pending[i] += _int(by_class.get(w))
        active: dict[int, int] = {}
        for core in _all_cores(stats):
            core_id = core.get("core_id")
            if isinstance(core_id, int):
                busy[core_id] = busy.get(core_id, 0) + _int(core.get("busy_workers"))
                active[core_id] = active.get(core_id, 0) + _int(core.get("active_workers"))
        self._active = active
        parts = ((pending[0], pending[1], pending[2]), busy, bool(stats.get("draining")), bool(stats.get("paused")))
        return totals, parts

    def _point(self, last: _Totals, now: _Totals, pending: tuple[int, int, int], busy: dict[int, int],
               draining: bool, paused: bool) -> _Point:
        dt = max(now.at - last.at, 1e-9)
        settled = max(0, now.settled - last.settled)
        by_weight: tuple[float, float, float] | None = (0.0, 0.0, 0.0) if settled == 0 else None
        queue_wait = run_time = None
        if settled:
            # Every settled call is appended to the history as it settles, on this loop: the
            # newest `settled` rows are this interval's calls (the most recent ones when it held more).
            records = self.coordinator.history(min(settled, HISTORY_READ))
            shares = [0, 0, 0]
            waits: list[float] = []
            runs: list[float] = []
            for record in records:
                if record.weight in WEIGHTS:
                    shares[WEIGHTS.index(record.weight)] += 1
                if record.queue_wait is not None:
                    waits.append(record.queue_wait)
                if record.run_time is not None:
                    runs.append(record.run_time)
            seen = sum(shares)
            if seen:
                by_weight = (settled * shares[0] / seen / dt, settled * shares[1] / seen / dt,
                             settled * shares[2] / seen / dt)
            queue_wait, run_time = _percentiles(waits), _percentiles(runs)
        # Evicted reputation rows take their counts with them: a drop is not a negative refusal.
        blocked = max(0, now.blocked - last.blocked)
        rejected = max(0, now.rejected - last.rejected - blocked)
        gate_closed = last.closed and now.closed
        refusals = (0 if gate_closed else rejected, blocked, rejected if gate_closed else 0,
                    max(0, now.quarantined - last.quarantined), max(0, now.killed - last.killed),
                    max(0, now.timeout - last.timeout))
        seq = self._seq
        self._seq += 1
        return _Point(seq, self._wall(), settled / dt, by_weight, queue_wait, run_time, pending, busy,
                      tuple(n / dt for n in refusals), draining, paused)

    # -- reading -------------------------------------------------------------------------------

    @property
    def points(self) -> int:
        """Points held now (at most ``capacity``)."""
        return len(self._points)

    def snapshot(self, after: int | None = None) -> dict[str, Any]:
        """The window as columns (JSON-ready): see ``SeriesResponse`` in the admin API.

        With *after*, only points whose ``seq`` is greater (incremental polling).
        """
        points: Sequence[_Point] = list(self._points)
        if after is not None:
            points = [p for p in points if p.seq > after]
        domains = sorted({core for p in points for core in p.busy} | set(self._domains()))
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "interval": self.interval,
            "window": self.window,
            "capacity": self.capacity,
            "seq": [p.seq for p in points],
            "t": [round(p.t, 3) for p in points],
            "throughput": [p.throughput for p in points],
            "throughput_by_weight": {w: [None if p.by_weight is None else p.by_weight[i] for p in points]
                                     for i, w in enumerate(WEIGHTS)},
            "queue_wait": {q: [None if p.queue_wait is None else p.queue_wait[i] for p in points]
                           for i, q in enumerate(("p50", "p99"))},
            "run_time": {q: [None if p.run_time is None else p.run_time[i] for p in points]
                         for i, q in enumerate(("p50", "p99"))},
            "pending": {w: [p.pending[i] for p in points] for i, w in enumerate(WEIGHTS)},
            "busy_workers": {str(d): [p.busy.get(d) for p in points] for d in domains},
            "workers": {str(d): self._active.get(d, 0) for d in domains},
            "refusals": {k: [p.refusals[i] for p in points] for i, k in enumerate(REFUSAL_KINDS)},
            "draining": [p.draining for p in points],
            "paused": [p.paused for p in points],
        }

    def _domains(self) -> list[int]:
        return list(range(1, self.coordinator.num_cores + 1))

    # -- the sampling task ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the sampling task runs."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start sampling on the running loop (idempotent; the baseline is taken at once).

        Raises:
            RuntimeError: outside a running event loop.
        """
        if self._task is None and not self.closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"tokengate-series:{self.coordinator.name}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        logger.debug("tokengate series: sampling coordinator %r every %g s", self.coordinator.name, self.interval)
        try:
            due = loop.time()
            while True:
                self.sample()
                if not self.coordinator.running:
                    return  # that was the last sample: a stopped coordinator never changes again
                due += self.interval
                delay = due - loop.time()
                if delay < 0:  # fell behind (a busy loop): skip the missed ticks instead of bunching them
                    due, delay = loop.time(), 0.0
                await asyncio.sleep(delay)
        finally:
            self.closed = True

    def stop(self) -> None:
        """Stop sampling now (idempotent); the points stay readable."""
        self.closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    async def aclose(self) -> None:
        """Stop, and wait until the sampling task has finished."""
        task = self._task
        self.stop()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def __repr__(self) -> str:
        return (f"<SeriesRecorder {self.coordinator.name!r} interval={self.interval:g}s window={self.window:g}s "
                f"points={len(self._points)}/{self.capacity}{' running' if self.running else ''}>")


class SeriesRecorders:
    """The recorders of one admin router: one per coordinator, created on demand.

    Thread: the server's event loop.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL, window: float = DEFAULT_WINDOW) -> None:
        """Raises ConfigurationError for a bad *interval* or *window* (see check_series_options)."""
        self.interval, self.window = check_series_options(interval, window)
        self._recorders: weakref.WeakKeyDictionary[OperationsCoordinator, SeriesRecorder] = \
            weakref.WeakKeyDictionary()

    def recorder(self, coordinator: OperationsCoordinator) -> SeriesRecorder:
        """*coordinator*'s recorder, created and started if there is none (a stopped one is kept to be read)."""
        recorder = self._recorders.get(coordinator)
        if recorder is None:
            recorder = SeriesRecorder(coordinator, interval=self.interval, window=self.window)
            self._recorders[coordinator] = recorder
            if coordinator.running:
                recorder.start()
        return recorder

    async def close(self, coordinator: OperationsCoordinator) -> None:
        """Stop and forget *coordinator*'s recorder, if any."""
        recorder = self._recorders.pop(coordinator, None)
        if recorder is not None:
            await recorder.aclose()

    @asynccontextmanager
    async def lifespan(self, app: ASGIApp) -> AsyncIterator[None]:
        """The admin router's lifespan: sample the app's coordinator from startup to shutdown.

        FastAPI's ``include_router`` nests it inside the app's lifespan, so
        :func:`~tokengate_fastapi.tokengate_lifespan` has already started the
        coordinator (and published it as ``app.state.tokengate``) when this runs.
        """
        found = getattr(getattr(app, "state", None), STATE_KEY, None)
        coordinator = found if isinstance(found, OperationsCoordinator) and found.running else None
        if coordinator is not None:
            self.recorder(coordinator)
        else:
            logger.debug("tokengate series: no running coordinator in app.state at startup; sampling starts "
                         "with the first /history/series request")
        try:
            yield None
        finally:
            if coordinator is not None:
                await self.close(coordinator)
