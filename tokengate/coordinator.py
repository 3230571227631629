"""``OperationsCoordinator``: owns the workers, admits and routes calls, settles tokens.

Lifecycle::

    new ──start()/astart()──► running ──drain()──► running, gate closed ──resume()──► running
                                 │
                                 └──stop()/aclose()──► stopping ──► stopped

Two modes:

* **attached** (``async with OperationsCoordinator():`` or ``await astart()``):
  the coordinator settles tokens on the running event loop (a FastAPI server's).
* **standalone** (``start()`` from sync code, or from inside a running loop as
  the seeds do): the coordinator runs its own event loop in a thread.

The class is assembled from three modules, one concept each: admission and
routing (:mod:`tokengate._admission`), settlement, where worker threads meet
the loop (:mod:`tokengate._settlement`), and this one: construction,
lifecycle, control and statistics.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Deque, Iterable

from . import current
from .decorator import GuardedFunction
from .errors import (
    ConfigurationError,
    CoordinatorNotRunning,
    CoordinatorStopped,
    TokenKilled,
    WouldDeadlock,
)
from .metrics import ExecutionRecord, RateMeter, Reservoir
from .policy import Policy
from .routing import IN_POLICY, Router
from .worker import Worker
from .states import TERMINAL_STATES, TokenState
from .tags import WEIGHTS
from .token import TaskToken
from .topology import RoutingTable, Topology, detect_topology, routing_table
from ._admission import AdmissionMixin
from ._plan import _Plan
from ._settlement import SettlementMixin

if TYPE_CHECKING:
    import os

    from .fleet import Fleet
    from .lanes.dask import DaskLane

__all__ = ["OperationsCoordinator", "KillResult", "DrainReport"]

logger = logging.getLogger(__name__)

_S = TokenState
_perf = time.perf_counter
# Seconds stop() still waits for worker threads to leave once the grace is spent.
_WORKER_EXIT_GRACE = 0.5
#: How many operation types may be paused at once (see OperationsCoordinator.pause).
MAX_PAUSED_OPERATIONS = 4096


@dataclass(frozen=True)
class KillResult:
    """What ``kill()`` did. ``killed`` is False for an executing token, which cannot be interrupted."""

    token_id: str
    killed: bool
    found: bool
    state: str | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "killed": self.killed, "found": self.found, "state": self.state,
                "message": self.message}


@dataclass(frozen=True)
class DrainReport:
    """What ``drain()`` saw: whether everything accepted settled before the timeout."""

    drained: bool
    settled_during_drain: int
    remaining: int
    elapsed: float

    def to_dict(self) -> dict[str, Any]:
        return {"drained": self.drained, "settled_during_drain": self.settled_during_drain,
                "remaining": self.remaining, "elapsed": round(self.elapsed, 6)}


class OperationsCoordinator(AdmissionMixin, SettlementMixin):
    """Runs decorated calls on per-core worker domains and settles their tokens.

    Args:
        num_cores: Worker domains to create. Default: the logical CPUs this
            process may use (its affinity mask, via psutil).
        workers_per_core: Threads per domain (default 4).
        mailbox_size: Bound of each worker's FIFO mailbox (default 64).
        max_pending: Per weight class, how many tokens may wait for a mailbox
            before calls are refused with ``Overloaded`` (default 65,536).
        bulkhead_reserve: Workers of a domain that a class spilling onto a
            domain it does not own may never take (default 1).
        stop_timeout: Seconds ``stop()`` lets queued work finish (default 30).
        policies: The safety and locality policies, in order. ``None`` means
            :func:`tokengate.policies.default_policies`; ``[]`` means none.
        history_size: Settled calls kept in the execution history (default 1000).
        reservoir_size: Recent samples kept for latency percentiles (default 4096).
        name: Used in thread names and logs.
        pace_after: Seconds (default 0.02). A thread worker whose call ran at
            least this long waits for the loop to settle it before taking its
            next call: one loop round trip per long call, so that identical
            long calls queued under a flood do not stay phase-locked and come
            back in waves the loop must answer in one stretch (which is what
            makes every other request on the loop wait). Bounded: a loop that
            lags more than 0.1 s does not hold the worker. ``None``: never
            wait (each worker chains its queued calls back to back).
        process_workers: Worker processes of the process lane (functions
            tagged ``lane: "process"``), spread evenly over the domains
            (rounded up to a multiple of ``num_cores``). Default: two per
            domain, or more to cover the usable CPUs. ``0``: no process lane.
        warm_processes: Start the worker processes with the coordinator, in
            parallel on their workers' threads (``ready`` turns True when they
            are up). Default False: each process starts at its worker's first
            call. The FastAPI lifespan turns this on.
        max_calls_per_process: Replace a worker process after this many calls
            (None: never), between calls, as loky and Ray do against leaks.
        max_process_rss: Replace a worker process whose resident memory
            exceeds this many bytes (checked between calls; None: never).
        dask_address: The Dask scheduler of the Dask lane (functions tagged
            ``lane: "dask"``), e.g. ``"tcp://10.0.0.5:8786"``. Default: the
            ``TOKENGATE_DASK_ADDRESS`` environment variable, else an embedded
            ``LocalCluster`` (worker processes with one thread each, as many
            as ``dask_local_workers``) started by the lane and closed at stop.
        dask_inflight: Calls in flight on the cluster per domain (the lane's
            workers per domain), so each weight class has a bounded number of
            calls on the cluster and the rest wait in TokenGate's queues.
            Default 64 when ``distributed`` is installed (``tokengate[dask]``),
            else no Dask lane. ``0``: no Dask lane.
        warm_dask: Connect (and start the embedded cluster) with the
            coordinator; the start fails with ``ClusterUnavailable`` if the
            scheduler cannot be reached, unless ``dask_optional``. Default
            False: the lane connects at its first call.
        dask_optional: An unreachable scheduler does not fail the start nor
            hold ``ready`` back: Dask-lane calls settle with
            ``ClusterUnavailable`` (HTTP 503) until the lane connects.
        dask_local_workers: Worker processes of the embedded cluster
            (default: the usable CPUs).
        fleet_dir: A directory shared by the server processes of one app
            (``uvicorn --workers N``, gunicorn): this coordinator joins their
            fleet when it starts and leaves it when it stops, so the admin
            API can answer for, and control, every process (see
            :mod:`tokengate.fleet`). Default: the ``TOKENGATE_FLEET_DIR``
            environment variable; unset or empty: no fleet. ``fleet`` is the
            :class:`~tokengate.fleet.Fleet` (None without one).

    Raises:
        ConfigurationError: for any invalid option, at construction.
    """

    def __init__(
        self,
        *,
        num_cores: int | None = None,
        workers_per_core: int = 4,
        mailbox_size: int = 64,
        max_pending: int = 65_536,
        bulkhead_reserve: int = 1,
        stop_timeout: float = 30.0,
        policies: Iterable[Policy] | None = None,
        history_size: int = 1000,
        reservoir_size: int = 4096,
        name: str = "tokengate",
        pace_after: float | None = 0.02,
        process_workers: int | None = None,
        warm_processes: bool = False,
        max_calls_per_process: int | None = None,
        max_process_rss: int | None = None,
        dask_address: str | None = None,
        dask_inflight: int | None = None,
        warm_dask: bool = False,
        dask_optional: bool = False,
        dask_local_workers: int | None = None,
        fleet_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.topology: Topology = detect_topology()
        cores = self.topology.usable_cpus if num_cores is None else num_cores
        _check_int("num_cores", cores, 1, 1024)
        _check_int("workers_per_core", workers_per_core, 1, 256)
        _check_int("mailbox_size", mailbox_size, 1, 1 << 20)
        _check_int("max_pending", max_pending, 0, 1 << 30)
        _check_int("bulkhead_reserve", bulkhead_reserve, 0, workers_per_core)
        _check_int("history_size", history_size, 1, 1 << 20)
        _check_int("reservoir_size", reservoir_size, 16, 1 << 22)
        if isinstance(stop_timeout, bool) or not isinstance(stop_timeout, (int, float)) or stop_timeout < 0:
            raise ConfigurationError(f"stop_timeout must be a number of seconds >= 0, got {stop_timeout!r}")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty string, got {name!r}")
        if pace_after is not None and (isinstance(pace_after, bool) or not isinstance(pace_after, (int, float))
                                       or not 0 < pace_after < math.inf):
            raise ConfigurationError(
                f"pace_after must be a number of seconds > 0, or None to never pace, got {pace_after!r}")
        # A call that ran this long is settled before its worker takes the next (see _complete_paced).
        self._pace_after = math.inf if pace_after is None else float(pace_after)
        if policies is None:
            from .policies import default_policies

            policy_list = default_policies()
        else:
            policy_list = list(policies)
        names = set()
        for p in policy_list:
            if not isinstance(p, Policy):
                raise ConfigurationError(f"policies must be Policy instances, got {type(p).__name__} {p!r}")
            if p.name in names:
                raise ConfigurationError(f"two policies are named {p.name!r}; give each policy once")
            names.add(p.name)
        self.name = name
        self.num_cores = cores
        self.workers_per_core = workers_per_core
        self.stop_timeout = float(stop_timeout)
        self.policies: tuple[Policy, ...] = tuple(policy_list)
        self.routing = routing_table(cores, workers_per_core, bulkhead_reserve)
        # One router per lane; they share the routing lock. The thread lane's
        # router is also self._router (the lock's owner, and the hot path's).
        self._router = Router(self, self.routing, mailbox_size, max_pending, lane="thread")
        self._routers: dict[str, Router] = {"thread": self._router}
        self._warm_processes = warm_processes
        self._started_lanes = {"thread"}  # see _start_lane
        self.process_routing: RoutingTable | None = None
        per_domain = _process_workers_per_domain(process_workers, cores, self.topology.usable_cpus)
        if not isinstance(warm_processes, bool):
            raise ConfigurationError(f"warm_processes must be True or False, got {warm_processes!r}")
        for label, value in (("max_calls_per_process", max_calls_per_process), ("max_process_rss", max_process_rss)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{label} must be a positive int or None, got {value!r}")
        if per_domain:
            from .lanes.process_worker import ProcessWorker

            child_options = {"max_calls": max_calls_per_process, "max_rss": max_process_rss}

            def make_process_worker(coordinator: OperationsCoordinator, core_id: int, index: int) -> Worker:
                return ProcessWorker(coordinator, core_id, index, child_options, warm_processes)

            self.process_routing = routing_table(cores, per_domain, min(bulkhead_reserve, per_domain - 1))
            self._routers["process"] = Router(self, self.process_routing, mailbox_size, max_pending,
                                              lane="process", lock=self._router.lock,
                                              make_worker=make_process_worker)
        self._dask = self._make_dask_lane(dask_address, dask_inflight, warm_dask, dask_optional, dask_local_workers,
                                          mailbox_size, max_pending, bulkhead_reserve)
        self._refill_batch = max(1, mailbox_size // 2)
        # An idle worker takes queued tokens from a sibling whose call has run this long.
        self._steal_after = 0.005
        # Guards every token's state field (see TaskToken._transition). Always
        # taken after, never before, the routing lock.
        self._state_lock = threading.Lock()
        self._phase = "new"
        self._gate_open = True
        self._accepting = False  # phase == running and gate open: the one check on the hot path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._own_thread: threading.Thread | None = None
        # Keyed by the function's process-unique number (GuardedFunction._uid),
        # dropped when the function is collected (see _plan_for). Per function:
        # its plan, and the plan for calls made inside a marked token (None when
        # no policy follows marked parents).
        self._plans: dict[int, tuple[_Plan, _Plan | None]] = {}
        self._live: dict[int, TaskToken[Any]] = {}
        # Completed tokens on their way back to the loop, and whether a drain is scheduled.
        # (token, outcome, is_error); is_error None means "already settled elsewhere".
        self._done: Deque[TaskToken[Any]] = collections.deque()
        # Long calls' completions, each with the worker waiting for it to settle (see _complete_paced).
        self._done_paced: Deque[tuple[TaskToken[Any], Worker]] = collections.deque()
        self._drain_scheduled = False
        # Settles handed over by kills and stops on other threads (see _post_settle): whether their
        # drain is queued on the loop, read and written under the lock so "True" means queued.
        self._posted_lock = threading.Lock()
        self._posted_queued = False
        self._accepted = 0  # written under the routing lock
        self._settled = 0  # written on the loop thread only
        # Calls refused before acceptance, by terminal state; written under the routing lock.
        self._refused: dict[TokenState, int] = {_S.REJECTED: 0, _S.QUARANTINED: 0}
        self._retries = 0
        # Retry backoff timers by token seq, so a token settled during its backoff
        # (killed, timed out, stopped) is not kept alive by its timer.
        self._backoffs: dict[int, asyncio.TimerHandle] = {}
        self._abandoned = 0
        self._by_state: dict[TokenState, int] = {s: 0 for s in TERMINAL_STATES}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._queue_wait = Reservoir(reservoir_size)
        self._run_time = Reservoir(reservoir_size)
        # Bound appends for the settle loop (the hot path); _timed counts samples.
        self._qw_samples = self._queue_wait.samples.append
        self._rt_samples = self._run_time.samples.append
        self._timed = 0
        self._run_timed = 0  # fewer than _timed: a call settled while running (timeout, stop) has no run time
        self._rate = RateMeter(10)
        self._history: Deque[tuple[Any, ...]] = collections.deque(maxlen=history_size)
        self._started_at: float | None = None
        self._started_wall: float | None = None
        self.fleet: Fleet | None = _make_fleet(fleet_dir)

    # -- lifecycle ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between start and stop."""
        return self._phase == "running"

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop tokens are settled on (None before start)."""
        return self._loop

    async def astart(self) -> OperationsCoordinator:
        """Start attached to the running event loop (the FastAPI lifespan's way). Idempotent."""
        if self._phase == "running":
            return self
        self._check_startable()
        self._begin(asyncio.get_running_loop())
        if self._dask is not None and self._dask.warm:
            await self._await_dask_start()
        if self.fleet is not None:  # bounded: a broken fleet file never holds the start
            await self.fleet.joined()
        return self

    def start(self) -> OperationsCoordinator:
        """Start standalone: run the coordinator's own event loop in a thread. Idempotent.

        Works from plain sync code and from inside a running loop (the loop
        is not used; tokens created there are still awaitable there).
        """
        if self._phase == "running":
            return self
        self._check_startable()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                asyncio.set_event_loop(loop)
                self._begin(loop)
            except BaseException as exc:  # pragma: no cover - reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._own_thread = threading.Thread(target=run, name=f"{self.name}-loop", daemon=True)
        self._own_thread.start()
        ready.wait()
        if failure:
            self._own_thread.join(timeout=10)  # it closes its loop and ends: leave no thread behind
            raise failure[0]
        if self._dask is not None and self._dask.warm and self._loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._await_dask_start(), self._loop).result()
            except BaseException:
                self._join_own_thread()  # the failed start stopped its loop: leave no thread behind
                raise
        if self.fleet is not None:
            self.fleet.wait_joined()
        return self

    def _check_startable(self) -> None:
        if self._phase != "new":
            raise CoordinatorNotRunning(
                f"coordinator {self.name!r} is {self._phase}; a stopped coordinator cannot be restarted, "
                "create a new OperationsCoordinator"
            )

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start workers and policies. Thread: the coordinator's loop thread."""
        self._loop = loop
        self._loop_thread_id = threading.get_ident()
        self._started_at = _perf()
        self._started_wall = time.time()
        started: list[Policy] = []
        try:
            for worker in self._router.workers:
                worker.start(self.name)
            if self._warm_processes and "process" in self._routers:
                self._start_lane("process")
            if self._dask is not None and self._dask.warm:
                self._start_lane("dask")
                self._dask.start(loop)
            for p in self.policies:
                p.on_start(self)
                started.append(p)
        except BaseException:
            self._undo_start(started)
            raise
        self._phase = "running"
        self._accepting = self._gate_open
        current.push(self)
        if self.fleet is not None:
            self.fleet.start(self)  # its thread joins; the fleet's standing state is applied on this loop
        logger.info(
            "coordinator %s started (%s): %d cores x %d workers",
            self.name, "standalone" if self._own_thread else "attached", self.num_cores, self.workers_per_core,
        )

    def _undo_start(self, started: list[Policy]) -> None:
        """A start failed part-way: stop the policies that started and the worker threads, in reverse order.

        The coordinator ends "stopped" (its threads cannot be started twice);
        the error that failed the start propagates to the caller.
        """
        for p in reversed(started):
            try:
                p.on_stop(self)
            except Exception:
                logger.exception("policy %s failed in on_stop while undoing a failed start", p.name)
        workers = [w for w in self._workers() if w.thread is not None]
        for worker in workers:
            worker.stopping = True
            worker.wake()
        for worker in workers:
            worker.thread.join(timeout=_WORKER_EXIT_GRACE)  # type: ignore[union-attr]
        self._phase = "stopped"
        self._accepting = False
        logger.error("coordinator %s: start failed; undone (%d policies stopped, %d worker threads joined)",
                     self.name, len(started), len(workers))

    def _workers(self) -> list[Worker]:
        """Every worker of every lane."""
        return [w for router in self._routers.values() for w in router.workers]

    def _lane_router(self, guarded: GuardedFunction[..., Any]) -> Router:
        """The router of the lane *guarded* runs on (its ``lane`` tag), its workers started. Thread: any."""
        router = self._routers.get(guarded.lane)
        if router is None and guarded.lane == "dask" and self._dask_lazy is not None:
            router = self._add_lazy_dask_lane()
        if router is None:
            raise ConfigurationError(
                f"{guarded.qualname}() runs on the {guarded.lane!r} lane, which coordinator {self.name!r} "
                f"does not have (lanes: {', '.join(self._routers)}); give it "
                + ("dask_inflight > 0 (and install tokengate[dask])" if guarded.lane == "dask" else "process_workers > 0"))
        if guarded.lane not in self._started_lanes:
            self._start_lane(guarded.lane)
        return router

    def _start_lane(self, lane: str) -> None:
        """Start the worker threads of a lane other than threads: with the coordinator when warm, else at first use.

        A coordinator that never runs a process-lane call starts no extra thread.
        """
        with self._router.lock:
            if lane in self._started_lanes or self._phase not in ("new", "running"):
                return
            self._started_lanes.add(lane)
            for worker in self._routers[lane].workers:
                worker.start(self.name)

    def _make_dask_lane(self, address: str | None, inflight: int | None, warm: bool, optional: bool,
                        local_workers: int | None, mailbox_size: int, max_pending: int,
                        bulkhead_reserve: int) -> DaskLane | None:
        """Build the Dask lane's router and its DaskLane (None: no Dask lane). See the dask_* options."""
        from .lanes import dask as dask_lane
        from .lanes import dask_config

        for label, flag in (("warm_dask", warm), ("dask_optional", optional)):
            if not isinstance(flag, bool):
                raise ConfigurationError(f"{label} must be True or False, got {flag!r}")
        if local_workers is not None:
            _check_int("dask_local_workers", local_workers, 1, 1024)
        resolved = dask_config.address_from(address)
        self._dask_lazy: tuple[Any, ...] | None = None
        if inflight is None:
            asked = resolved is not None or warm or local_workers is not None
            if not asked:
                # Not configured: the lane (router, workers) is made at the first Dask-lane call, if
                # distributed is installed, so coordinators that never use it show no Dask workers.
                if dask_config.distributed_available():
                    self._dask_lazy = (optional, mailbox_size, max_pending, bulkhead_reserve)
                return None
            inflight = dask_config.DEFAULT_INFLIGHT
        _check_int("dask_inflight", inflight, 0, 4096)
        if inflight == 0:
            return None
        dask_config.require_distributed("the Dask lane (dask_inflight > 0)")
        from .lanes.dask_worker import DaskRouter, DaskWorker

        lane = dask_lane.DaskLane(name=self.name, address=resolved, optional=optional, warm=warm,
                                  local_workers=local_workers or self.topology.usable_cpus)

        def make_dask_worker(coordinator: OperationsCoordinator, core_id: int, index: int) -> Worker:
            return DaskWorker(coordinator, core_id, index, lane)

        table = routing_table(self.num_cores, inflight, min(bulkhead_reserve, inflight - 1))
        router = DaskRouter(self, table, mailbox_size, max_pending, lane="dask",
                            lock=self._router.lock, make_worker=make_dask_worker)
        router.dask = lane  # refuses new calls at submit while the scheduler is lost
        self._routers["dask"] = router
        return lane

    def _add_lazy_dask_lane(self) -> Router | None:
        """Make the unconfigured Dask lane at its first call (embedded cluster or TOKENGATE_DASK_ADDRESS). Thread: any."""
        with self._router.lock:
            if self._dask is None and self._dask_lazy is not None and self._phase in ("new", "running"):
                optional, mailbox_size, max_pending, bulkhead_reserve = self._dask_lazy
                routers = dict(self._routers)  # copy-on-write: other threads may be iterating the old dict
                current_routers, self._routers = self._routers, routers
                try:
                    from .lanes.dask_config import DEFAULT_INFLIGHT

                    self._dask = self._make_dask_lane(None, DEFAULT_INFLIGHT, False, optional, None, mailbox_size, max_pending,
                                                      bulkhead_reserve)
                except BaseException:
                    self._routers = current_routers
                    raise
            return self._routers.get("dask")

    async def _await_dask_start(self) -> None:
        """A warm Dask lane: wait for its connection; a required one that failed fails the start (stopped first)."""
        assert self._dask is not None
        try:
            await self._dask.wait_started()
        except BaseException:
            await self._shutdown(0.0)
            raise

    async def __aenter__(self) -> OperationsCoordinator:
        return await self.astart()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __enter__(self) -> OperationsCoordinator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: refuse new calls, let accepted work finish, then settle the rest.

        Waits up to *timeout* (default ``stop_timeout``) for accepted calls to
        finish; every token still unsettled after that is settled with
        ``CoordinatorStopped`` (an executing one keeps its thread until the
        function returns, but no awaiter waits for it). Idempotent.

        Thread: any thread except the coordinator's own loop thread; in
        attached mode use ``await aclose()`` on the loop.

        Raises:
            ConfigurationError: if *timeout* is not None or a number of seconds >= 0.
        """
        _check_timeout(timeout)  # before the stop begins: a bad value must not leave it half-stopped
        if self._phase in ("new", "stopped"):
            self._phase = "stopped"
            return
        loop = self._loop
        assert loop is not None
        if threading.get_ident() == self._loop_thread_id:
            raise WouldDeadlock(
                "stop() cannot block the coordinator's own event loop; use `await coordinator.aclose()` there"
            )
        if loop.is_closed():
            self._phase = "stopped"
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop)
        future.result()
        self._join_own_thread()

    async def aclose(self, timeout: float | None = None) -> None:
        """The async form of :meth:`stop`; callable from any event loop. Idempotent."""
        _check_timeout(timeout)
        if self._phase in ("new", "stopped"):
            self._phase = "stopped"
            return
        loop = self._loop
        assert loop is not None
        if asyncio.get_running_loop() is loop:
            await self._shutdown(timeout)
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop))
        if self._own_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._join_own_thread)

    def _join_own_thread(self) -> None:
        thread = self._own_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    async def _shutdown(self, timeout: float | None) -> None:
        """Thread: the coordinator's loop."""
        if self._phase != "running":
            while self._phase == "stopping":
                await asyncio.sleep(0.005)
            return
        with self._router.lock:  # see AdmissionMixin.submit: the gate closes under the routing lock
            self._phase = "stopping"
            self._accepting = False
        grace = self.stop_timeout if timeout is None else max(0.0, float(timeout))
        stop_by = _perf() + grace
        # Graceful means queued work finishes: lift pauses so nothing waits forever.
        self._resume_all()
        drained = await self._wait_idle(grace)
        if not drained:
            logger.warning("coordinator %s: %d tokens still unsettled after %.1fs; settling them as stopped",
                           self.name, self.inflight, grace)
        for token in list(self._live.values()):
            running = token._tstate is _S.EXECUTING
            if self._kill_token(token, CoordinatorStopped(
                    f"coordinator {self.name!r} stopped before token {token.token_id} settled",
                    token_id=token.token_id, reason="coordinator stopped"), any_state=True) and running:
                self._interrupt(token, "coordinator stopped")
        self._settle_all()
        workers = self._workers()
        for worker in workers:
            worker.stopping = True
            worker.wake()
        # One budget for the whole stop: workers get what is left of the grace, and at
        # least a moment to leave (an idle one exits at once; one still inside a
        # function that never returns is abandoned, it is a daemon thread).
        deadline = max(stop_by, _perf() + _WORKER_EXIT_GRACE)
        while any(w.thread is not None and w.thread.is_alive() for w in workers) and _perf() < deadline:
            await asyncio.sleep(0.002)
        stuck = [w.worker_id for w in workers if w.thread is not None and w.thread.is_alive()]
        if stuck:
            logger.warning("coordinator %s: workers still running user code at stop: %s", self.name, stuck)
        if self._dask is not None:  # after its workers: closes the client and any embedded cluster
            await self._dask.aclose()
        self._settle_all()
        for p in reversed(self.policies):
            try:
                p.on_stop(self)
            except Exception:
                logger.exception("policy %s failed in on_stop", p.name)
        if self.fleet is not None:  # leaves with the final counters (the write is on the fleet thread)
            await self.fleet.aclose()
        current.remove(self)
        self._plans.clear()
        self._phase = "stopped"
        for fut in self._idle_waiters:
            if not fut.done():
                fut.set_result(None)
        self._idle_waiters.clear()
        if self._own_thread is not None:
            asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)
        logger.info("coordinator %s stopped", self.name)

    # -- control ---------------------------------------------------------------

    def pause(self, operation_type: str | None = None) -> None:
        """Hold admission: new and pending calls wait (globally, or for one operation type).

        Calls already in a worker's mailbox still run. ``resume()`` releases them.
        A paused operation holds at most ``max_pending`` calls; past that new
        calls are refused with ``Overloaded``. At most ``MAX_PAUSED_OPERATIONS``
        operation types are paused at once, so names from an admin request
        cannot grow memory without bound.

        Raises:
            ConfigurationError: *operation_type* is not a non-empty string, or
                that many operation types are already paused (resume some, or
                pause globally with ``pause()``).
        """
        if operation_type is not None and (not isinstance(operation_type, str) or not operation_type):
            raise ConfigurationError(f"operation_type must be a non-empty string or None, got {operation_type!r}")
        with self._router.lock:
            if operation_type is None:
                for router in self._routers.values():
                    router.paused = True
            else:
                paused_ops = self._router.paused_ops
                if operation_type not in paused_ops and len(paused_ops) >= MAX_PAUSED_OPERATIONS:
                    raise ConfigurationError(
                        f"{len(paused_ops)} operation types are already paused (the limit is "
                        f"{MAX_PAUSED_OPERATIONS}); resume some, or pause everything with pause()")
                for router in self._routers.values():
                    router.paused_ops.add(operation_type)
        logger.warning("coordinator %s: admission paused%s", self.name,
                       "" if operation_type is None else f" for {operation_type!r}")

    def resume(self, operation_type: str | None = None) -> None:
        """Release a pause (global or per operation); the global form also reopens a drained gate."""
        released: list[TaskToken[Any]] = []
        with self._router.lock:
            for router in self._routers.values():
                if operation_type is None:
                    router.paused = False
                else:
                    router.paused_ops.discard(operation_type)
                    released += router.release_held(operation_type)
            if operation_type is None:
                self._gate_open = True
                self._accepting = self._phase == "running"
        for token in released:
            self._reroute(token)
        for worker in self._workers():
            worker.wake()
        logger.warning("coordinator %s: admission resumed%s", self.name,
                       "" if operation_type is None else f" for {operation_type!r}")

    def _resume_all(self) -> None:
        released: list[TaskToken[Any]] = []
        with self._router.lock:
            for router in self._routers.values():
                router.paused = False
                ops = list(router.paused_ops)
                router.paused_ops.clear()
                released += [t for op in ops for t in router.release_held(op)]
        for token in released:
            self._reroute(token)
        for worker in self._workers():
            worker.wake()

    @property
    def ready(self) -> bool:
        """True when running and every lane's workers are up (warm worker processes started)."""
        return self._phase == "running" and all(
            getattr(w, "ready", True) for router in self._routers.values() for w in router.workers)

    def cluster(self) -> dict[str, Any] | None:
        """The Dask lane's cluster and connection (as ``stats()["lanes"]["dask"]["cluster"]``); None without one.

        Thread: any (a snapshot: state, scheduler address, workers with their
        resources, calls in flight by class, counts).
        """
        lane = self._dask
        return None if lane is None else lane.describe()

    @property
    def paused(self) -> bool:
        """True while global admission is paused."""
        return self._router.paused

    @property
    def draining(self) -> bool:
        """True while the gate is closed by drain() (until resume())."""
        return not self._gate_open

    @property
    def inflight(self) -> int:
        """Calls accepted and not yet settled."""
        return self._accepted - self._settled

    async def drain(self, timeout: float | None = None) -> DrainReport:
        """Close the gate and wait until every accepted call has settled.

        New calls are refused with ``GateClosed`` until ``resume()``. Returns a
        report; ``drained`` is False if *timeout* seconds passed first (the
        work keeps running). Awaitable from any event loop. A pause is not
        lifted: calls it holds do not progress, so a drain during a pause
        reports ``drained=False`` after *timeout* unless they are resumed.

        Raises:
            ConfigurationError: if *timeout* is not None or a number of seconds >= 0.
        """
        _check_timeout(timeout)  # before the gate closes
        if self._phase != "running":
            return DrainReport(self._phase == "stopped", 0, self.inflight, 0.0)
        with self._router.lock:  # see AdmissionMixin.submit: every call accepted from now on is counted below
            self._gate_open = False
            self._accepting = False
        logger.warning("coordinator %s: draining (%d in flight)", self.name, self.inflight)
        before = self._settled
        start = _perf()
        loop = self._loop
        assert loop is not None
        if asyncio.get_running_loop() is loop:
            drained = await self._wait_idle(timeout)
        else:
            drained = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._wait_idle(timeout), loop))
        return DrainReport(drained, self._settled - before, self.inflight, _perf() - start)

    async def _wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing is in flight. Thread: loop."""
        if self._accepted == self._settled:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return self._accepted == self._settled
        return True

    def get_token(self, token_id: str | int) -> TaskToken[Any] | None:
        """The live (unsettled) token with this id, or None."""
        try:
            return self._live.get(int(token_id))
        except (TypeError, ValueError):
            return None

    def find_token_record(self, token_id: str | int) -> dict[str, Any] | None:
        """Status of a live token, or the history record of a recently settled one, or None."""
        token = self.get_token(token_id)
        if token is not None:
            return token.status()
        try:
            seq = int(token_id)
        except (TypeError, ValueError):
            return None
        for row in reversed(self._history):
            if row[0] == seq:
                return self._record(row).to_dict()
        return None

    def kill(self, token_id: str | int, reason: str = "killed by operator") -> KillResult:
        """Kill a token that has not started: it settles as KILLED at once (awaiters get ``TokenKilled``).

        An executing token cannot be interrupted: the result says so and the
        token runs to completion. Thread: any.
        """
        token = self.get_token(token_id)
        tid = str(token_id)
        if token is None:
            return KillResult(tid, False, False, None, "no live token with this id (unknown or already settled)")
        exc = TokenKilled(f"token {tid} ({token.operation_type}) was killed: {reason}", token_id=tid, reason=reason)
        if self._kill_token(token, exc):
            return KillResult(tid, True, True, _S.KILLED.value, "killed before it started")
        if token._plan.router.lane != "thread" and token._tstate is _S.EXECUTING:
            # A lane that can stop a running call (the process lane ends its process).
            if self._kill_token(token, exc, any_state=True):
                self._interrupt(token, "killed")
                return KillResult(tid, True, True, _S.KILLED.value,
                                  "killed while running: its worker process was ended (and is replaced)")
        state = token._tstate
        if state is _S.EXECUTING:
            return KillResult(tid, False, True, state.value,
                              "token is executing and cannot be interrupted; it will run to completion")
        return KillResult(tid, False, True, state.value, f"token is already {state.value}")

    def kill_operation(self, operation_type: str, reason: str = "killed by operator") -> int:
        """Kill every not-yet-started token of *operation_type*; return how many were killed."""
        count = 0
        for token in list(self._live.values()):
            if token.operation_type == operation_type:
                exc = TokenKilled(f"token {token.token_id} ({operation_type}) was killed: {reason}",
                                  token_id=token.token_id, reason=reason)
                if self._kill_token(token, exc):
                    count += 1
        return count

    def set_active_workers(self, core_id: int, active: int) -> None:
        """Set how many workers of a domain take new tokens (used by convergence).

        Raises:
            ConfigurationError: for an unknown core or an *active* outside 1..workers_per_core.
        """
        self._check_core(core_id)
        _check_int("active", active, 1, self.workers_per_core)
        self._router.set_active(core_id, active)

    def active_workers(self, core_id: int) -> int:
        """How many workers of a domain currently take new tokens (ConfigurationError for an unknown core)."""
        self._check_core(core_id)
        return self._router.cores[core_id].active

    def _check_core(self, core_id: object) -> None:
        # True and 1.0 equal 1 as dict keys: refuse them rather than read them as core 1.
        if not isinstance(core_id, int) or isinstance(core_id, bool) or core_id not in self._router.cores:
            raise ConfigurationError(f"unknown core {core_id!r}; cores are the integers 1..{self.num_cores}")

    def unblock(self, operation_type: str) -> bool:
        """Lift a reputation block of *operation_type*; True if it was blocked.

        Raises:
            ConfigurationError: if no ``ReputationPolicy`` is installed.
        """
        return bool(self._require_policy("reputation", "ReputationPolicy").unblock(operation_type))  # type: ignore[attr-defined]

    def hold(self, operation_type: str) -> None:
        """Send every new call of *operation_type* to the quarantine for review (``QuarantinePolicy``)."""
        self._require_policy("quarantine", "QuarantinePolicy").hold(operation_type)  # type: ignore[attr-defined]

    def unhold(self, operation_type: str) -> None:
        """Let new calls of *operation_type* run again (held records stay in the quarantine)."""
        self._require_policy("quarantine", "QuarantinePolicy").unhold(operation_type)  # type: ignore[attr-defined]

    def _require_policy(self, name: str, cls_name: str) -> Policy:
        found = self.policy(name)
        if found is None:
            raise ConfigurationError(
                f"no {name!r} policy is installed; pass policies=[..., {cls_name}(), ...] to OperationsCoordinator")
        return found

    def policy(self, name: str) -> Policy | None:
        """The installed policy with this name, or None."""
        for p in self.policies:
            if p.name == name:
                return p
        return None

    # -- statistics ---------------------------------------------------------------

    def _record(self, row: tuple[Any, ...]) -> ExecutionRecord:
        (seq, op, state, weight, qw, rt, core, worker, attempt, settled, error) = row
        offset = time.time() - _perf()
        return ExecutionRecord(str(seq), op, state, state == _S.COMPLETED.value, weight, qw, rt, core, worker, attempt,
                               round(settled + offset, 6), error, "")

    def history(self, limit: int = 100) -> list[ExecutionRecord]:
        """The most recent settled calls, newest first (bounded by ``history_size``)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit must be a positive integer, got {limit!r}")
        rows = list(self._history)[-limit:]
        rows.reverse()
        return [self._record(r) for r in rows]

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot: counts by state, per-core and per-worker queues, latencies, policies.

        ``queue_wait`` is creation → start on a worker (pending and mailbox
        time); ``run_time`` is the function's own wall time on its worker. Both
        are over the most recent ``reservoir_size`` calls.
        """
        router = self._router
        snap = router.snapshot()
        others = {lane: r.snapshot() for lane, r in self._routers.items() if r is not router}
        executing = sum(1 for w in self._workers() if w.current is not None)
        admitted = sum(core["queue_depth"] for s in (snap, *others.values()) for core in s["cores"])
        uptime = 0.0 if self._started_at is None else _perf() - self._started_at
        held_by_policies = sum(1 for t in list(self._live.values()) if t._where == IN_POLICY)
        counts = {
            "accepted": self._accepted,
            "settled": self._settled,
            "inflight": self.inflight,
            "rejected_at_submit": sum(self._refused.values()),
            "retries": self._retries,
            "late_completions_discarded": self._abandoned,
            "waiting": sum(s["pending_total"] + sum(s["held"].values()) for s in (snap, *others.values()))
            + held_by_policies,
            "admitted": admitted,
            "executing": executing,
            **{s.value: n + self._refused.get(s, 0) for s, n in self._by_state.items()},
        }
        routed_by_weight = {w: sum(c["routed"][w] for c in snap["cores"]) for w in WEIGHTS}
        return {
            "name": self.name,
            "phase": self._phase,
            "mode": "standalone" if self._own_thread is not None else ("attached" if self._loop else "none"),
            "uptime": round(uptime, 3),
            "started_at": self._started_wall,
            "paused": router.paused,
            "draining": not self._gate_open,
            "paused_operations": snap["paused_operations"],
            "topology": {**self.topology.to_dict(), "num_cores": self.num_cores,
                         "workers_per_core": self.workers_per_core,
                         "total_workers": self.num_cores * self.workers_per_core},
            "routing": self.routing.to_dict(),
            "counts": counts,
            "throughput_per_s": self._rate.rate(),
            "queue_wait": self._queue_wait.summary(self._timed),
            "run_time": self._run_time.summary(self._run_timed),
            "pending": snap["pending"],
            "pending_total": snap["pending_total"],
            "peak_pending": snap["peak_pending"],
            "held": snap["held"],
            "mailbox_size": snap["mailbox_size"],
            "max_pending": snap["max_pending"],
            "routed_by_weight": routed_by_weight,
            "cores": snap["cores"],
            # Lanes other than threads (whose figures are the ones above): their
            # own domains, queues and workers, with each worker process's figures.
            "lanes": {lane: {**s, "ready": all(getattr(w, "ready", True) for w in self._routers[lane].workers),
                             "routing": self._routers[lane].table.to_dict(),
                             **({"cluster": self._dask.describe()} if lane == "dask" and self._dask else {})}
                      for lane, s in others.items()},
            "policies": {p.name: _safe_stats(p) for p in self.policies},
        }

    def __repr__(self) -> str:
        return (f"<OperationsCoordinator {self.name!r} {self._phase} cores={self.num_cores} "
                f"workers_per_core={self.workers_per_core} inflight={self.inflight}>")


def _make_fleet(fleet_dir: object) -> Fleet | None:
    from .fleet import Fleet, fleet_dir_from_env

    directory = fleet_dir_from_env() if fleet_dir is None else fleet_dir
    return None if directory is None else Fleet(directory)  # type: ignore[arg-type]


def _safe_stats(policy: Policy) -> dict[str, Any]:
    try:
        return policy.stats()
    except Exception:
        logger.exception("policy %s failed in stats()", policy.name)
        return {"error": "stats unavailable"}


def _process_workers_per_domain(process_workers: object, num_cores: int, usable_cpus: int) -> int:
    """Worker processes per domain for the *process_workers* option (see OperationsCoordinator)."""
    if process_workers is None:
        return max(2, -(-usable_cpus // num_cores))
    if isinstance(process_workers, bool) or not isinstance(process_workers, int) or not 0 <= process_workers <= 4096:
        raise ConfigurationError(
            f"process_workers must be an int in 0..4096 (0: no process lane) or None, got {process_workers!r}")
    return -(-process_workers // num_cores)


def _check_timeout(value: object) -> None:
    # `not value >= 0` also refuses NaN.
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
        raise ConfigurationError(f"timeout must be None or a number of seconds >= 0, got {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be between {low} and {high}, got {value!r}")
