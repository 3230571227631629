"""Admission: a call becomes a token, passes the policies, and is routed (or refused).

Part of :class:`~tokengate.OperationsCoordinator` (a mixin, so the hot path
stays plain attribute access). Thread: any thread may submit; routing state is
guarded by the router's lock.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
import weakref
from typing import Any

from ._coordinator_base import CoordinatorBase
from ._plan import _Plan
from .current import _worker_local
from .decorator import GuardedFunction
from .errors import (
    CoordinatorNotRunning,
    GateClosed,
    Rejected,
    TokenKilled,
    TokenQuarantined,
    WouldDeadlock,
    describe_exception,
)
from .lanes.references import check_importable
from .routing import IN_CORE_PENDING, IN_PENDING, IN_POLICY, NOWHERE
from .states import TokenState
from .token import EMPTY_CONTEXT, NO_KWARGS, TaskToken
from .worker import Worker, run_token

logger = logging.getLogger("tokengate.coordinator")

_S = TokenState
_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident
_perf = time.perf_counter
_future_set_result = asyncio.Future.set_result
_REJECTED = TokenState.REJECTED
# What an inline run may claim: only the state it found under the routing lock.
# (Between that look and the claim, a mailbox token may be run by its worker and
# go back to WAITING for a retry backoff, which must not be claimed.)
_CLAIM_ADMITTED = frozenset({_S.ADMITTED})
_CLAIM_WAITING = frozenset({_S.WAITING})
_copy_context = contextvars.copy_context
# How many holds a waiting worker follows (a call held behind a call held behind...).
_HELD_CHAIN = 8


class AdmissionMixin(CoordinatorBase):
    """Submission, policy admission, routing, refills and inline runs."""

    def submit(self, guarded: GuardedFunction[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskToken[Any]:
        """Submit one call of *guarded* and return its token. Decorated functions call this.

        Raises:
            CoordinatorNotRunning: before start or after stop.
            GateClosed: while draining or stopping.
            Overloaded, OperationBlocked, TokenQuarantined: refused by admission or a policy.
        """
        if not self._accepting:
            raise self._gate_refusal(guarded)
        # The token belongs to the caller's loop. On the coordinator's own loop
        # thread that is the coordinator's loop (it must be running there for any
        # token to settle), so the costly look-up (a getpid() system call in
        # asyncio's C code) is needed only on other threads.
        if _get_ident() == self._loop_thread_id:
            loop = self._loop
        else:
            loop = _get_running_loop() or self._loop
        context = _copy_context()
        token: TaskToken[Any] = TaskToken(loop, self, guarded, args, kwargs or NO_KWARGS,  # type: ignore[arg-type]
                                          context if context else EMPTY_CONTEXT)
        plans = self._plans.get(guarded._uid) or self._plan_for(guarded)
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
            router = plan.router
            refusal: Rejected | None = None
            lock = router.lock
            lock.acquire()  # not `with`: it costs twice as much, once per call
            try:
                # The gate again, under the lock that stop() and drain() close it
                # with: a call is accepted before the gate closes (so they wait
                # for it and stop's sweep sees it) or refused, never in between.
                if not self._accepting:
                    raise self._closed_gate(guarded)
                router.route(token, None, refuse=True)
            except Rejected as exc:
                self._refused[_REJECTED] += 1
                refusal = exc
            else:
                self._accepted += 1
                self._live[token._seq] = token
            finally:
                lock.release()
            if refusal is not None:
                self._refuse_at_submit(token, plan, refusal, counted=True)
                raise refusal
        if guarded.timeout is not None:
            self._arm_timeout(token, guarded.timeout)
        return token

    def _gate_refusal(self, guarded: GuardedFunction[..., Any]) -> Exception:
        """The refusal of a call that found the gate closed; a GateClosed is counted as REJECTED.

        Counted like the same refusal found under the routing lock (see
        _closed_gate), so statistics do not depend on which check saw it.
        """
        if self._phase in ("running", "stopping"):
            with self._router.lock:
                self._refused[_REJECTED] += 1
        if self._phase == "running":
            return GateClosed(
                f"coordinator {self.name!r} is draining; {guarded.operation_type!r} refused "
                "(call resume() to reopen the gate)", operation_type=guarded.operation_type)
        if self._phase == "stopping":
            return GateClosed(f"coordinator {self.name!r} is stopping; no new calls are accepted",
                              operation_type=guarded.operation_type)
        return CoordinatorNotRunning(
            f"coordinator {self.name!r} is {self._phase}; start it before calling {guarded.qualname}()")

    def _closed_gate(self, guarded: GuardedFunction[..., Any]) -> GateClosed:
        """The refusal of a call that passed the gate just before it closed. Caller holds the routing lock."""
        what = "draining" if self._phase == "running" else self._phase
        return GateClosed(f"coordinator {self.name!r} is {what}; {guarded.operation_type!r} refused",
                          operation_type=guarded.operation_type)

    def _plan_for(self, guarded: GuardedFunction[..., Any]) -> tuple[_Plan, _Plan | None]:
        router = self._lane_router(guarded)
        if guarded.reference is not None:  # the process lane: the name must now lead to this function
            check_importable(guarded.map_of or guarded)
        nested = _Plan(self.policies, guarded, router, nested=True) if any(
            p.follows_marked_parent and not p.interested(guarded) for p in self.policies) else None
        plans = (_Plan(self.policies, guarded, router), nested)
        # Keyed by the function's number, not the function: a dynamically decorated
        # function (a partial) nobody references any more is collected, and its
        # plans are dropped with it.
        uid = guarded._uid
        if uid not in self._plans:
            weakref.finalize(guarded, self._plans.pop, uid, None)
        self._plans[uid] = plans
        return plans

    def _admit(self, token: TaskToken[Any], plan: _Plan, *, refuse: bool) -> None:
        """Run admit hooks, then route. Raises a refusal only when *refuse* (first submission)."""
        router = plan.router
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
                        if not self._accepting:  # see submit(): accepted before the gate closed, or refused
                            closed: Rejected | None = self._closed_gate(token._guarded)  # type: ignore[arg-type]
                        else:
                            closed = None
                            token._force_transition(_S.WAITING)
                            self._accepted += 1
                            self._live[token._seq] = token
                    else:
                        closed = None
                    # The policy may already have released it from another thread
                    # (between its admit() returning False and this lock).
                    early, token._release_early = token._release_early, False
                    if not early and closed is None:
                        token._where = IN_POLICY
                if closed is not None:
                    self._refuse_at_submit(token, plan, closed)
                    raise closed
                if not early:
                    return
                return self._admit(token, plan, refuse=False)
        self._route_with_hooks(token, plan, refuse=refuse)

    def _route_with_hooks(self, token: TaskToken[Any], plan: _Plan, *, refuse: bool) -> None:
        """pick_core hooks, then place or queue the token, then on_routed hooks."""
        router = plan.router
        pin = None
        marked = token.policy_data is not None
        pickers = plan.pick_core + plan.pick_core_marked if marked else plan.pick_core
        routed_hooks = plan.on_routed + plan.on_routed_marked if marked else plan.on_routed
        with router.lock:
            state = token._tstate
            if state is not _S.CREATED and state is not _S.WAITING:
                # Settled (killed, timed out) or claimed since a policy or resume()
                # released it: there is nothing left to route.
                return
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
            first = state is _S.CREATED
            try:
                if first and not self._accepting:  # see submit()
                    raise self._closed_gate(token._guarded)  # type: ignore[arg-type]
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
            self._refuse_at_submit(token, plan, refusal, counted=True)
            raise refusal

    def _refuse_at_submit(self, token: TaskToken[Any], plan: _Plan, exc: Rejected, *, counted: bool = False) -> None:
        """A call refused before acceptance: record it, release policy holds, drop it. Submitting thread.

        *counted* says the router already counted the refusal under its lock.
        """
        state = _S.QUARANTINED if isinstance(exc, TokenQuarantined) else _S.REJECTED
        token._force_transition(state)
        token._outcome, token._is_error = exc, True
        if not counted:
            with self._router.lock:
                self._refused[state] += 1
        self._run_settle_hooks(token, plan)
        token._drop_call()
        token._finalized = token._published = True

    def _settle_refused(self, token: TaskToken[Any], exc: Rejected) -> None:
        """An accepted token refused on re-admission (a retry or a release): settle it for its awaiter."""
        state = _S.QUARANTINED if isinstance(exc, TokenQuarantined) else _S.REJECTED
        with self._router.lock:
            ok = token._transition_settling(state, exc)
            if ok:
                token._plan.router.forget_waiting(token)
        if ok:
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
        try:
            self._admit(token, plan, refuse=False)
        except Exception as exc:  # noqa: BLE001 - the caller releases others after this one
            self._settle_stranded(token, exc)

    def _reroute(self, token: TaskToken[Any]) -> None:
        """Route a token resume() took from a paused operation's held calls; never raises."""
        if token._guarded is None:
            return
        try:
            self._route_with_hooks(token, token._plan, refuse=False)
        except Exception as exc:  # noqa: BLE001 - resume() reroutes the others after this one
            self._settle_stranded(token, exc)

    def _settle_stranded(self, token: TaskToken[Any], exc: BaseException) -> None:
        """A released token could not be routed (a bug or a failing hook): settle it rather than strand it."""
        logger.error("coordinator %s: routing released token %s failed; it settles as killed",
                     self.name, token.token_id, exc_info=exc)
        error = TokenKilled(
            f"token {token.token_id} ({token.operation_type}) was killed: routing it after its release failed "
            f"({describe_exception(exc)})", token_id=token.token_id, reason="routing failed")
        error.__cause__ = exc
        self._kill_token(token, error, any_state=False)

    def _refill(self, worker: Worker) -> bool:
        """Move pending tokens into an empty mailbox, or steal from a stuck sibling. Thread: that worker."""
        router = worker.router
        if router.paused:
            return False
        if not router.pending_total:
            # Cheap unlocked look first: only take the lock if a sibling looks stuck.
            left = router.stuck_in(worker, self._steal_after)
            if left is None or left > 0:
                return False
            with router.lock:
                return router.steal(worker, self._steal_after) is not None
        with router.lock:
            placed = router.take_pending(worker, self._refill_batch)
            if placed:
                for token in placed:
                    plan = token._plan
                    if plan is None:
                        continue
                    hooks = plan.on_routed
                    if plan.on_routed_marked and token.policy_data is not None:
                        hooks = hooks + plan.on_routed_marked
                    for p in hooks:
                        try:
                            p.on_routed(token, worker.core_id)
                        except Exception:
                            logger.exception("policy %s failed in on_routed", p.name)
        return bool(placed)

    def _steal_wait(self, worker: Worker) -> float | None:
        """How long a parking *worker* may sleep before a sibling could count as stuck. Thread: that worker.

        None (sleep until woken) unless a sibling on the same domain has tokens
        queued behind a running call; then the time until that call has run
        ``steal_after`` seconds, or ``steal_after`` again if it already has (the
        refill just found nothing it may take).
        """
        left = worker.router.stuck_in(worker, self._steal_after)
        if left is None:
            return None
        return left if left > 0 else self._steal_after

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
        if token._plan.router.lane != "thread":
            return False  # its own lane runs it; this thread is not that lane's, and waiting cannot deadlock it
        self._try_run_inline(token, worker)
        return True

    def _try_run_inline(self, token: TaskToken[Any], worker: Worker) -> None:
        """Run *token* on this worker if it sits in a mailbox or a pending queue (not held, not paused).

        If a policy holds it behind another call (``held_behind``), run that
        call instead, following such holds up to ``_HELD_CHAIN`` calls deep.
        """
        # A worker waiting on a token that has not started runs it itself, so
        # a parent blocking on its children can never exhaust the pool. Tokens
        # a policy holds, a paused operation holds, or a retry backoff delays
        # are not run: that would break the promise of the hold. But the call a
        # held token waits for may be run, as it must run first anyway.
        for _ in range(_HELD_CHAIN):
            with self._router.lock:
                state = token._tstate
                where = token._where
                if state is _S.WAITING and where in (IN_PENDING, IN_CORE_PENDING):
                    # Out of the queue now: until the claim only a kill or timeout can move it.
                    token._plan.router.forget_waiting(token)
                    claimable = _CLAIM_WAITING
                    break
                if state is _S.ADMITTED:
                    claimable = _CLAIM_ADMITTED
                    break
            if state is not _S.WAITING or where != IN_POLICY:
                return
            behind = self._held_behind(token)
            if behind is None or behind is token:
                return
            token = behind
        else:
            return
        run_token(token, worker, claimable)
        del token  # see run_token: frames kept by a traceback must not pin the token

    def _held_behind(self, token: TaskToken[Any]) -> TaskToken[Any] | None:
        """The call a policy holds *token* behind, if one says so. Thread: a waiting worker."""
        plan: _Plan | None = token._plan
        if plan is None:
            return None
        for p in plan.held_behind:
            try:
                behind = p.held_behind(token)
            except Exception:
                logger.exception("policy %s failed in held_behind", p.name)
                continue
            if behind is not None:
                return behind
        return None
