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

Where threads meet the loop (the whole list): ``_complete`` (a worker hands a
finished token over; one ``call_soon_threadsafe`` per batch, not per token),
``_post_settle`` (a kill or timeout from another thread), and foreign-loop
awaiters (``_resolve_foreign``).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Iterable, Sequence

from . import current
from .current import _worker_local
from .decorator import GuardedFunction
from .errors import (
    ConfigurationError,
    CoordinatorNotRunning,
    CoordinatorStopped,
    GateClosed,
    Rejected,
    TokenKilled,
    TokenTimeout,
    WouldDeadlock,
)
from .metrics import ExecutionRecord, RateMeter, Reservoir
from .policy import HOOKS, Policy
from .routing import IN_CORE_PENDING, IN_PENDING, IN_POLICY, NOWHERE, Router
from .states import TERMINAL_STATES, TokenState
from .tags import WEIGHTS
from .token import TaskToken
from .topology import Topology, detect_topology, routing_table
from .worker import Worker, run_token

__all__ = ["OperationsCoordinator", "KillResult", "DrainReport"]

logger = logging.getLogger(__name__)

_S = TokenState
_get_running_loop = asyncio._get_running_loop
_copy_context = contextvars.copy_context
_perf = time.perf_counter
_future_set_result = asyncio.Future.set_result
_REJECTED = TokenState.REJECTED
_NOT_STARTED = frozenset({_S.CREATED, _S.WAITING, _S.ADMITTED})
_STEALABLE = frozenset({_S.ADMITTED, _S.WAITING})


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


class _Plan:
    """The hooks that apply to one decorated function, computed once per coordinator."""

    __slots__ = HOOKS + ("pick_core_marked", "on_routed_marked", "slow", "marked_routes", "on_settle_for")
    before_submit: tuple[Policy, ...]
    admit: tuple[Policy, ...]
    pick_core: tuple[Policy, ...]
    on_routed: tuple[Policy, ...]
    after_run: tuple[Policy, ...]
    on_settle: tuple[Policy, ...]
    # Routing hooks of policies that asked for them only on tokens they marked.
    pick_core_marked: tuple[Policy, ...]
    on_routed_marked: tuple[Policy, ...]
    slow: bool
    marked_routes: bool
    # on_settle hooks per terminal state (policies may narrow with settle_states).
    on_settle_for: dict[TokenState, tuple[Policy, ...]]

    def __init__(self, policies: Sequence[Policy], guarded: GuardedFunction[..., Any], nested: bool = False) -> None:
        interested = [p for p in policies if p.interested(guarded) or (nested and p.follows_marked_parent)]
        for hook in HOOKS:
            chosen = [p for p in interested if getattr(type(p), hook) is not getattr(Policy, hook)]
            if hook in ("after_run", "on_settle"):
                chosen.reverse()
            if hook in ("pick_core", "on_routed"):
                setattr(self, hook + "_marked", tuple(p for p in chosen if p.route_marked_only))
                chosen = [p for p in chosen if not p.route_marked_only]
            setattr(self, hook, tuple(chosen))
        # Precomputed for submit(): does admission need the general path?
        self.slow = bool(self.admit or self.pick_core or self.on_routed)
        self.on_settle_for = {
            state: tuple(p for p in self.on_settle if p.settle_states is None or state in p.settle_states)
            for state in TERMINAL_STATES
        }
        self.marked_routes = bool(self.pick_core_marked or self.on_routed_marked)

    def routes(self, token: TaskToken[Any]) -> bool:
        """True when some routing hook applies to *token* (marked tokens: see Policy.route_marked_only)."""
        if self.pick_core or self.on_routed:
            return True
        return token.policy_data is not None and bool(self.pick_core_marked or self.on_routed_marked)


class OperationsCoordinator:
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
        self._router = Router(self, self.routing, mailbox_size, max_pending)
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
        # Keyed by the function object itself (identity hash): a strong reference
        # for the coordinator's life, so an id can never be reused by another function.
        # Per function: its plan, and the plan for calls made inside a marked
        # token (None when no policy follows marked parents).
        self._plans: dict[GuardedFunction[..., Any], tuple[_Plan, _Plan | None]] = {}
        self._live: dict[int, TaskToken[Any]] = {}
        # Completed tokens on their way back to the loop, and whether a drain is scheduled.
        # (token, outcome, is_error); is_error None means "already settled elsewhere".
        self._done: Deque[tuple[TaskToken[Any], Any, bool | None]] = collections.deque()
        self._drain_scheduled = False
        self._accepted = 0  # written under the routing lock
        self._settled = 0  # written on the loop thread only
        # Calls refused before acceptance, by terminal state; written under the routing lock.
        self._refused: dict[TokenState, int] = {_S.REJECTED: 0, _S.QUARANTINED: 0}
        self._retries = 0
        self._abandoned = 0
        self._by_state: dict[TokenState, int] = {s: 0 for s in TERMINAL_STATES}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._queue_wait = Reservoir(reservoir_size)
        self._run_time = Reservoir(reservoir_size)
        # Bound appends for the settle loop (the hot path); _timed counts samples.
        self._qw_samples = self._queue_wait.samples.append
        self._rt_samples = self._run_time.samples.append
        self._timed = 0
        self._rate = RateMeter(10)
        self._history: Deque[tuple[Any, ...]] = collections.deque(maxlen=history_size)
        self._started_at: float | None = None
        self._started_wall: float | None = None

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
            raise failure[0]
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
        for worker in self._router.workers:
            worker.start(self.name)
        for p in self.policies:
            p.on_start(self)
        self._phase = "running"
        self._accepting = self._gate_open
        current.push(self)
        logger.info(
            "coordinator %s started (%s): %d cores x %d workers",
            self.name, "standalone" if self._own_thread else "attached", self.num_cores, self.workers_per_core,
        )

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
        """
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
        self._phase = "stopping"
        self._accepting = False
        grace = self.stop_timeout if timeout is None else max(0.0, float(timeout))
        # Graceful means queued work finishes: lift pauses so nothing waits forever.
        self._resume_all()
        drained = await self._wait_idle(grace)
        if not drained:
            logger.warning("coordinator %s: %d tokens still unsettled after %.1fs; settling them as stopped",
                           self.name, self.inflight, grace)
        for token in list(self._live.values()):
            self._kill_token(token, CoordinatorStopped(
                f"coordinator {self.name!r} stopped before token {token.token_id} settled",
                token_id=token.token_id, reason="coordinator stopped"), any_state=True)
        self._drain_done()
        workers = self._router.workers
        for worker in workers:
            worker.stopping = True
            worker.wake()
        deadline = _perf() + max(grace, 1.0)
        while any(w.thread is not None and w.thread.is_alive() for w in workers) and _perf() < deadline:
            await asyncio.sleep(0.002)
        stuck = [w.worker_id for w in workers if w.thread is not None and w.thread.is_alive()]
        if stuck:
            logger.warning("coordinator %s: workers still running user code at stop: %s", self.name, stuck)
        self._drain_done()
        for p in reversed(self.policies):
            try:
                p.on_stop(self)
            except Exception:
                logger.exception("policy %s failed in on_stop", p.name)
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

    # -- submission (any thread) ---------------------------------------------

    def submit(self, guarded: GuardedFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskToken[Any]:
        """Submit one call of *guarded* and return its token. Decorated functions call this.

        Raises:
            CoordinatorNotRunning: before start or after stop.
            GateClosed: while draining or stopping.
            Overloaded, OperationBlocked, TokenQuarantined: refused by admission or a policy.
        """
        if not self._accepting:
            raise self._gate_refusal(guarded)
        loop = _get_running_loop() or self._loop
        token: TaskToken[Any] = TaskToken(loop, self, guarded, args, kwargs, _copy_context())  # type: ignore[arg-type]
        plans = self._plans.get(guarded) or self._plan_for(guarded)
        plan = plans[0]
        if plans[1] is not None:
            # Called inside a token some policy marked (a conductor domain)?
            worker = _worker_local.worker
            if worker is not None:
                parent = worker.current
                if parent is not None and parent.policy_data is not None:
                    plan = plans[1]
        token._plan = plan
        if plan.before_submit:
            for p in plan.before_submit:
                try:
                    p.before_submit(token)
                except Rejected as exc:
                    self._refuse_at_submit(token, plan, exc)
                    raise
                except Exception:
                    logger.exception("policy %s failed in before_submit; call admitted anyway", p.name)
        if plan.slow or (plan.marked_routes and token.policy_data is not None):
            self._admit(token, plan, refuse=True)
        else:
            # Fast path: no policy takes part in admission or routing.
            router = self._router
            refusal: Rejected | None = None
            with router.lock:
                try:
                    router.route(token, None, refuse=True)
                except Rejected as exc:
                    self._refused[_REJECTED] += 1
                    refusal = exc
                else:
                    self._accepted += 1
                    self._live[token._seq] = token
            if refusal is not None:
                token._tstate = _S.REJECTED  # still private to this thread: no lock needed
                token._outcome, token._is_error = refusal, True
                if plan.on_settle:
                    self._run_settle_hooks(token, plan)
                token._drop_call()
                token._finalized = token._published = True
                raise refusal
        if guarded.timeout is not None:
            self._arm_timeout(token, guarded.timeout)
        return token

    def _gate_refusal(self, guarded: GuardedFunction[..., Any]) -> Exception:
        if self._phase == "running":
            return GateClosed(
                f"coordinator {self.name!r} is draining; {guarded.operation_type!r} refused "
                "(call resume() to reopen the gate)", operation_type=guarded.operation_type)
        if self._phase == "stopping":
            return GateClosed(f"coordinator {self.name!r} is stopping; no new calls are accepted",
                              operation_type=guarded.operation_type)
        return CoordinatorNotRunning(
            f"coordinator {self.name!r} is {self._phase}; start it before calling {guarded.qualname}()")

    def _plan_for(self, guarded: GuardedFunction[..., Any]) -> tuple[_Plan, _Plan | None]:
        nested = _Plan(self.policies, guarded, nested=True) if any(
            p.follows_marked_parent and not p.interested(guarded) for p in self.policies) else None
        plans = (_Plan(self.policies, guarded), nested)
        self._plans[guarded] = plans
        return plans

    def _admit(self, token: TaskToken[Any], plan: _Plan, *, refuse: bool) -> None:
        """Run admit hooks, then route. Raises a refusal only when *refuse* (first submission)."""
        router = self._router
        for p in plan.admit:
            try:
                admitted = p.admit(token)
            except Rejected as exc:
                if refuse:
                    self._refuse_at_submit(token, plan, exc)
                    raise
                self._settle_refused(token, exc)
                return
            except Exception:
                logger.exception("policy %s failed in admit; call admitted anyway", p.name)
                continue
            if not admitted:
                with router.lock:
                    if token._tstate is _S.CREATED:
                        token._force_transition(_S.WAITING)
                        self._accepted += 1
                        self._live[token._seq] = token
                    # The policy may already have released it from another thread
                    # (between its admit() returning False and this lock).
                    early, token._release_early = token._release_early, False
                    if not early:
                        token._where = IN_POLICY
                if not early:
                    return
                return self._admit(token, plan, refuse=False)
        self._route_with_hooks(token, plan, refuse=refuse)

    def _route_with_hooks(self, token: TaskToken[Any], plan: _Plan, *, refuse: bool) -> None:
        """pick_core hooks, then place or queue the token, then on_routed hooks."""
        router = self._router
        pin = None
        marked = token.policy_data is not None
        pickers = plan.pick_core + plan.pick_core_marked if marked else plan.pick_core
        routed_hooks = plan.on_routed + plan.on_routed_marked if marked else plan.on_routed
        with router.lock:
            for p in pickers:
                try:
                    pin = p.pick_core(token)
                except Exception:
                    logger.exception("policy %s failed in pick_core", p.name)
                    pin = None
                if pin is not None:
                    if pin not in router.cores:
                        logger.error("policy %s picked unknown core %r; ignoring", p.name, pin)
                        pin = None
                    else:
                        break
            first = token._tstate is _S.CREATED
            try:
                worker = router.route(token, pin, refuse=refuse and first)
            except Rejected as exc:
                self._refused[_S.REJECTED] += 1
                refusal: Rejected | None = exc
                worker = None
            else:
                refusal = None
                if first:
                    self._accepted += 1
                    self._live[token._seq] = token
                if worker is not None:
                    for p in routed_hooks:
                        try:
                            p.on_routed(token, worker.core_id)
                        except Exception:
                            logger.exception("policy %s failed in on_routed", p.name)
        if refusal is not None:
            token._force_transition(_S.REJECTED)
            token._outcome, token._is_error = refusal, True
            self._run_settle_hooks(token, plan)
            token._drop_call()
            token._finalized = token._published = True
            raise refusal

    def _refuse_at_submit(self, token: TaskToken[Any], plan: _Plan, exc: Rejected) -> None:
        """A call refused before acceptance: record it, release policy holds, drop it. Submitting thread."""
        from .errors import TokenQuarantined

        state = _S.QUARANTINED if isinstance(exc, TokenQuarantined) else _S.REJECTED
        token._transition(state)
        token._outcome, token._is_error = exc, True
        with self._router.lock:
            self._refused[state] += 1
        self._run_settle_hooks(token, plan)
        token._drop_call()
        token._finalized = token._published = True

    def _settle_refused(self, token: TaskToken[Any], exc: Rejected) -> None:
        """An accepted token refused on re-admission (a retry or a release): settle it for its awaiter."""
        from .errors import TokenQuarantined

        state = _S.QUARANTINED if isinstance(exc, TokenQuarantined) else _S.REJECTED
        with self._router.lock:
            ok = token._transition(state)
            if ok:
                self._router.forget_waiting(token)
        if ok:
            token._outcome, token._is_error = exc, True
            self._post_settle(token)

    def release_held(self, token: TaskToken[Any]) -> None:
        """Hand back a token a policy held in ``admit``; it continues to routing. Thread: any."""
        with self._router.lock:
            state = token._tstate
            if state is _S.CREATED or (state is _S.WAITING and token._where != IN_POLICY):
                # Released before the core recorded the hold: _admit will see this.
                token._release_early = True
                return
            if state is not _S.WAITING:
                return
            token._where = NOWHERE
        plan = token._plan
        if plan is None or token._guarded is None:
            return
        # Continue after the policy that held it: re-run only hooks after it is simpler
        # and safe because admit() must be idempotent for a token it already holds.
        self._admit(token, plan, refuse=False)

    def _arm_timeout(self, token: TaskToken[Any], seconds: float) -> None:
        loop = self._loop
        assert loop is not None
        if threading.get_ident() == self._loop_thread_id:
            token.timer = loop.call_later(seconds, self._expire, token, seconds)
        else:
            loop.call_soon_threadsafe(self._arm_on_loop, token, seconds)

    def _arm_on_loop(self, token: TaskToken[Any], seconds: float) -> None:
        if not token._finalized:
            elapsed = _perf() - token.created_at
            token.timer = self._loop.call_later(max(0.0, seconds - elapsed), self._expire, token, seconds)  # type: ignore[union-attr]

    def _expire(self, token: TaskToken[Any], seconds: float) -> None:
        """A token's timeout fired. Thread: loop."""
        token.timer = None
        started = token._tstate is _S.EXECUTING
        exc = TokenTimeout(
            f"{token.operation_type} token {token.token_id} did not finish within {seconds}s"
            + (" (still running on its worker; its result will be discarded)" if started else " (never started)"),
            token_id=token.token_id, timeout=seconds, started=started)
        with self._router.lock:
            ok = token._transition(_S.TIMEOUT)
            if ok:
                self._router.forget_waiting(token)
        if ok:
            token._outcome, token._is_error = exc, True
            self._finalize(token)

    # -- completion (worker threads → loop) ------------------------------------

    def _complete(self, token: TaskToken[Any], outcome: Any = None, is_error: bool | None = None) -> None:
        """A worker finished running *token*. Thread: a worker.

        Completions are batched: only the first one after a drain schedules
        another drain, so a burst costs one call_soon_threadsafe, not one per token.
        """
        self._done.append((token, outcome, is_error))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain_done)  # type: ignore[union-attr]
            except RuntimeError:  # loop closed: the coordinator is gone; nobody can await
                self._drain_scheduled = False

    def _post_settle(self, token: TaskToken[Any]) -> None:
        """Finalize a token that some thread just moved to a terminal state."""
        if threading.get_ident() == self._loop_thread_id:
            self._finalize(token)
        else:
            self._complete(token)

    def _drain_done(self) -> None:
        """Settle every completed token. Thread: loop."""
        # Reset the flag before popping: a worker that appends after our last
        # pop sees False and schedules another drain (see _complete).
        self._drain_scheduled = False
        pop = self._done.popleft
        n = 0
        while True:
            try:
                token, outcome, is_error = pop()
            except IndexError:
                break
            if token._finalized:
                if is_error is not None:
                    self._abandoned += 1  # a late completion after a timeout or stop
                continue
            if token._tstate is _S.EXECUTING and is_error is not None:
                token._outcome = outcome
                token._is_error = is_error
                plan = token._plan
                if plan.after_run:
                    delay = None
                    for p in plan.after_run:
                        try:
                            d = p.after_run(token)
                        except Exception:
                            logger.exception("policy %s failed in after_run", p.name)
                            continue
                        if d is not None and delay is None:
                            delay = d
                    if (delay is not None and self._phase == "running"
                            and token._transition(_S.WAITING, frozenset({_S.EXECUTING}))):
                        self._schedule_retry(token, plan, delay)
                        continue
                # Once EXECUTING, a token's state is changed only on this (the
                # loop) thread, so no lock is needed for this last move.
                token._tstate = _S.FAILED if token._is_error else _S.COMPLETED
            n += 1
            self._finalize(token)
        if n:
            self._rate.add(n)

    def _schedule_retry(self, token: TaskToken[Any], plan: _Plan, delay: float) -> None:
        self._retries += 1
        token.attempt += 1
        token._outcome, token._is_error = None, False
        token.started_at = token.finished_at = None
        loop = self._loop
        assert loop is not None
        loop.call_later(max(0.0, delay), self._readmit, token, plan)

    def _readmit(self, token: TaskToken[Any], plan: _Plan) -> None:
        """A retry goes back through admission: policies may refuse or hold it. Thread: loop."""
        if token._tstate is not _S.WAITING or self._phase != "running":
            return
        for p in plan.before_submit:
            try:
                p.before_submit(token)
            except Rejected as exc:
                self._settle_refused(token, exc)
                return
            except Exception:
                logger.exception("policy %s failed in before_submit (retry)", p.name)
        self._admit(token, plan, refuse=False)

    def _finalize(self, token: TaskToken[Any]) -> None:
        """Record and publish a terminal token exactly once. Thread: loop."""
        if token._finalized:
            return
        token._finalized = True
        state = token._tstate
        now = _perf()
        self._settled += 1
        self._by_state[state] += 1
        if token.timer is not None:
            token.timer.cancel()
            token.timer = None
        started = token.started_at
        qw: float | None = None
        rt: float | None = None
        if started is not None:
            qw = started - token.created_at
            self._qw_samples(qw)
            self._timed += 1
            finished = token.finished_at
            if finished is not None:
                rt = finished - started
                self._rt_samples(rt)
        self._history.append((
            token._seq, token.operation_type, state, token.weight, qw, rt, token.core_id, token.worker_id,
            token.attempt, now, type(token._outcome).__name__ if token._is_error else None,
        ))
        plan = token._plan
        if plan is not None:
            hooks = plan.on_settle_for[state]
            if hooks:
                self._run_settle_hooks(token, plan)
        self._live.pop(token._seq, None)
        token._guarded = token._args = token._kwargs = token._context = None
        if token._loop is self._loop:
            if not token.done():  # the awaiter may have cancelled it
                if token._is_error:
                    token._resolve_future()
                else:
                    _future_set_result(token, token._outcome)
        else:
            self._resolve_foreign(token)
        # Published last: get() returns only after hooks ran and the future is resolved.
        token._published = True
        if token._waiters is not None:
            token._wake_waiters()
        if self._idle_waiters and self._accepted == self._settled:
            for fut in self._idle_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._idle_waiters.clear()

    def _run_settle_hooks(self, token: TaskToken[Any], plan: _Plan) -> None:
        for p in plan.on_settle_for[token._tstate]:
            try:
                p.on_settle(token)
            except Exception:
                logger.exception("policy %s failed in on_settle", p.name)

    def _resolve_foreign(self, token: TaskToken[Any]) -> None:
        # The token was created on another event loop (standalone mode called
        # from async code): its future must be resolved on that loop's thread.
        try:
            token.get_loop().call_soon_threadsafe(token._resolve_future)
        except RuntimeError:  # that loop is closed; no one can await the token there
            pass

    # -- blocking get() support ------------------------------------------------

    def _before_blocking_get(self, token: TaskToken[Any]) -> bool:
        """Refuse a deadlocking get(); on a worker thread, run a not-yet-started token inline.

        Returns True when the caller is one of this coordinator's worker threads:
        get() then keeps retrying the inline run while it waits, because a token
        held by a policy (an ordered key, a tier slot) or waiting for a retry may
        become runnable later and land behind this very worker.
        """
        if threading.get_ident() == self._loop_thread_id:
            raise WouldDeadlock(
                f"token.get() on the coordinator's event-loop thread would deadlock; use `await token` "
                f"(token {token.token_id}, {token.operation_type})")
        running = _get_running_loop()
        if running is not None and running is token.get_loop() and running is self._loop:
            raise WouldDeadlock("token.get() inside the coordinator's running loop would deadlock; use `await token`")
        worker: Worker | None = _worker_local.worker
        if worker is None or worker.coordinator is not self:
            return False
        self._try_run_inline(token, worker)
        return True

    def _try_run_inline(self, token: TaskToken[Any], worker: Worker) -> None:
        """Run *token* on this worker if it sits in a mailbox or a pending queue (not held, not paused)."""
        # A worker waiting on a token that has not started runs it itself, so
        # a parent blocking on its children can never exhaust the pool. Tokens
        # a policy holds, a paused operation holds, or a retry backoff delays
        # are left alone: running them would break that promise.
        with self._router.lock:
            state = token._tstate
            if state is _S.WAITING and token._where in (IN_PENDING, IN_CORE_PENDING):
                self._router.forget_waiting(token)
            elif state is not _S.ADMITTED:
                return
        run_token(token, worker, _STEALABLE)
        del token  # see run_token: frames kept by a traceback must not pin the token

    # -- control ---------------------------------------------------------------

    def pause(self, operation_type: str | None = None) -> None:
        """Hold admission: new and pending calls wait (globally, or for one operation type).

        Calls already in a worker's mailbox still run. ``resume()`` releases them.
        """
        with self._router.lock:
            if operation_type is None:
                self._router.paused = True
            else:
                self._router.paused_ops.add(operation_type)
        logger.warning("coordinator %s: admission paused%s", self.name,
                       "" if operation_type is None else f" for {operation_type!r}")

    def resume(self, operation_type: str | None = None) -> None:
        """Release a pause (global or per operation); the global form also reopens a drained gate."""
        router = self._router
        released: list[TaskToken[Any]] = []
        with router.lock:
            if operation_type is None:
                router.paused = False
                self._gate_open = True
                self._accepting = self._phase == "running"
            else:
                router.paused_ops.discard(operation_type)
                released = router.release_held(operation_type)
        for token in released:
            self._reroute(token)
        for worker in router.workers:
            worker.wake()
        logger.warning("coordinator %s: admission resumed%s", self.name,
                       "" if operation_type is None else f" for {operation_type!r}")

    def _resume_all(self) -> None:
        router = self._router
        with router.lock:
            router.paused = False
            ops = list(router.paused_ops)
            router.paused_ops.clear()
            released = [t for op in ops for t in router.release_held(op)]
        for token in released:
            self._reroute(token)
        for worker in router.workers:
            worker.wake()

    def _reroute(self, token: TaskToken[Any]) -> None:
        guarded = token._guarded
        if guarded is None:
            return
        self._route_with_hooks(token, token._plan, refuse=False)

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
        work keeps running). Awaitable from any event loop.
        """
        if self._phase != "running":
            return DrainReport(self._phase == "stopped", 0, self.inflight, 0.0)
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

    def _kill_token(self, token: TaskToken[Any], exc: TokenKilled, *, any_state: bool = False) -> bool:
        token.kill_reason = exc.reason
        with self._router.lock:
            ok = token._transition(_S.KILLED, None if any_state else _NOT_STARTED)
            if ok:
                self._router.forget_waiting(token)
        if ok:
            token._outcome, token._is_error = exc, True
            self._post_settle(token)
        return ok

    def _abandon(self, token: TaskToken[Any]) -> None:
        """The awaiter of *token* was cancelled: kill it if it has not started."""
        if token._tstate in _NOT_STARTED and self._phase != "stopped":
            self._kill_token(token, TokenKilled(
                f"token {token.token_id} ({token.operation_type}) was killed: its awaiter was cancelled",
                token_id=token.token_id, reason="awaiter cancelled"))

    def set_active_workers(self, core_id: int, active: int) -> None:
        """Set how many workers of a domain take new tokens (used by convergence)."""
        if core_id not in self._router.cores:
            raise ConfigurationError(f"unknown core {core_id!r}; cores are 1..{self.num_cores}")
        _check_int("active", active, 1, self.workers_per_core)
        self._router.set_active(core_id, active)

    def active_workers(self, core_id: int) -> int:
        """How many workers of a domain currently take new tokens."""
        return self._router.cores[core_id].active

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

    # -- refill (worker threads) ------------------------------------------------

    def _refill(self, worker: Worker) -> bool:
        """Move pending tokens into an empty mailbox, or steal from a stuck sibling. Thread: that worker."""
        router = self._router
        if router.paused:
            return False
        if not router.pending_total:
            # Cheap unlocked look first: only take the lock if a sibling looks stuck.
            now = _perf()
            for sibling in router.cores[worker.core_id].workers:
                running = sibling.current
                if sibling is not worker and sibling.mailbox and running is not None:
                    started = running.started_at
                    if started is not None and now - started >= self._steal_after:
                        break
            else:
                return False
            with router.lock:
                return router.steal(worker, self._steal_after) is not None
        with router.lock:
            placed = router.take_pending(worker, self._refill_batch)
            if placed:
                for token in placed:
                    plan = token._plan
                    if plan is not None and plan.routes(token):
                        hooks = plan.on_routed + plan.on_routed_marked if token.policy_data is not None \
                            else plan.on_routed
                        for p in hooks:
                            try:
                                p.on_routed(token, worker.core_id)
                            except Exception:
                                logger.exception("policy %s failed in on_routed", p.name)
        return bool(placed)

    # -- statistics ---------------------------------------------------------------

    def _record(self, row: tuple[Any, ...]) -> ExecutionRecord:
        (seq, op, state, weight, qw, rt, core, worker, attempt, settled, error) = row
        offset = time.time() - _perf()
        return ExecutionRecord(str(seq), op, state.value, state is _S.COMPLETED, weight, qw, rt, core, worker, attempt,
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
        executing = sum(1 for w in router.workers if w.current is not None)
        admitted = sum(len(w.mailbox) for w in router.workers)
        uptime = 0.0 if self._started_at is None else _perf() - self._started_at
        held_by_policies = sum(1 for t in list(self._live.values()) if t._where == IN_POLICY)
        counts = {
            "accepted": self._accepted,
            "settled": self._settled,
            "inflight": self.inflight,
            "rejected_at_submit": sum(self._refused.values()),
            "retries": self._retries,
            "late_completions_discarded": self._abandoned,
            "waiting": snap["pending_total"] + sum(snap["held"].values()) + held_by_policies,
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
            "run_time": self._run_time.summary(self._timed),
            "pending": snap["pending"],
            "pending_total": snap["pending_total"],
            "peak_pending": snap["peak_pending"],
            "held": snap["held"],
            "mailbox_size": snap["mailbox_size"],
            "max_pending": snap["max_pending"],
            "routed_by_weight": routed_by_weight,
            "cores": snap["cores"],
            "policies": {p.name: _safe_stats(p) for p in self.policies},
        }

    def __repr__(self) -> str:
        return (f"<OperationsCoordinator {self.name!r} {self._phase} cores={self.num_cores} "
                f"workers_per_core={self.workers_per_core} inflight={self.inflight}>")


def _safe_stats(policy: Policy) -> dict[str, Any]:
    try:
        return policy.stats()
    except Exception:
        logger.exception("policy %s failed in stats()", policy.name)
        return {"error": "stats unavailable"}


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ConfigurationError(f"{name} must be between {low} and {high}, got {value!r}")
