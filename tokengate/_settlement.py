"""Settlement: finished tokens come back to the event loop and settle exactly once.

Part of :class:`~tokengate.OperationsCoordinator`. This is where worker threads
meet the loop: ``_complete`` batches completions (one ``call_soon_threadsafe``
per burst), ``_post_settle`` hands over kills and timeouts from other threads,
and ``_resolve_foreign`` resolves futures that belong to another event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ._coordinator_base import CoordinatorBase
from ._plan import _Plan
from .errors import (
    _UNDELIVERABLE,
    Rejected,
    SettlementFailed,
    TokenKilled,
    TokenTimeout,
    deliverable_exception,
    describe_exception,
)
from .states import TERMINAL_STATES, TokenState
from .token import TaskToken

if TYPE_CHECKING:
    from .worker import Worker

logger = logging.getLogger("tokengate.coordinator")

_S = TokenState
_get_running_loop = asyncio._get_running_loop
_perf = time.perf_counter
_future_set_result = asyncio.Future.set_result
_REJECTED = TokenState.REJECTED
# Members bound once for the settling loop: an enum attribute look-up costs about 100 ns on CPython 3.11.
_EXECUTING = TokenState.EXECUTING
_COMPLETED = TokenState.COMPLETED
_FAILED = TokenState.FAILED
_FROM_EXECUTING = frozenset({_EXECUTING})
_TERMINAL = TERMINAL_STATES
_NOT_STARTED = frozenset({_S.CREATED, _S.WAITING, _S.ADMITTED})
# Completed tokens settled per loop callback (see _drain_done). Small enough that
# other callbacks wait at most about a millisecond; large enough that the extra
# callback per chunk costs nothing measurable.
DRAIN_CHUNK = 256
# Long calls' completions settled per loop pass (see _settle_paced), and how
# long a worker waits at most for its long call to be settled (_complete_paced).
PACED_CHUNK = 4
PACE_TIMEOUT = 0.1


class SettlementMixin(CoordinatorBase):
    """Timeouts, completion batching, retries, finalization, kills."""

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
            ok = token._transition_settling(_S.TIMEOUT, exc)
            if ok:
                token._plan.router.forget_waiting(token)
        if ok:
            self._finalize(token)
            if started:
                self._interrupt(token, "timeout")

    def _interrupt(self, token: TaskToken[Any], reason: str) -> bool:
        """Stop *token*'s running call if its lane can (the process lane ends its process). Thread: any.

        The thread lane cannot interrupt a function: it returns False and the
        call runs to its end, its late result discarded.
        """
        router = token._plan.router
        if router.lane == "thread":
            return False
        for worker in router.workers:
            # Lanes other than threads have LaneWorkers, which may carry several calls at once.
            if worker.carries(token):
                return bool(worker.interrupt(token, reason))
        return False

    def _complete(self, token: TaskToken[Any]) -> None:
        """Hand *token* to the loop for settling. Thread: any (a worker, after setting the run slots).

        A worker sets ``token._run_outcome`` / ``_run_error`` first; a kill or
        timeout from another thread just moves the state. Completions are
        batched: only the first one after a drain schedules another drain, so a
        burst costs one call_soon_threadsafe, not one per token.
        """
        self._done.append(token)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain_done)  # type: ignore[union-attr]
            except RuntimeError:  # loop closed: the coordinator is gone; nobody can await
                self._drain_scheduled = False

    def _complete_paced(self, token: TaskToken[Any], worker: Worker) -> None:
        """Hand a long call's *token* to the loop and wait (bounded) until it is settled. Thread: *worker*'s own.

        Why: a worker that starts its next queued call the moment a long one
        ends, with no loop round trip, keeps identical calls phase-locked, so
        their completions come back in waves the loop must answer in one
        stretch while everything else on it waits (the flood benchmark's tail).
        Waiting for the loop to settle the call first couples the next start
        to the loop's own pace, as a thread pool fed by the loop is, which
        spreads the completions; it costs the next call one loop round trip,
        small beside a call of ``pace_after`` or more. Bounded by
        ``PACE_TIMEOUT``: a loop that lags longer does not hold workers back.
        """
        settled = worker.settled
        settled.clear()
        self._done_paced.append((token, worker))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain_done)  # type: ignore[union-attr]
            except RuntimeError:  # loop closed: nobody settles it; do not wait
                self._drain_scheduled = False
                return
        settled.wait(PACE_TIMEOUT)

    def _post_settle(self, token: TaskToken[Any]) -> None:
        """Finalize a token that some thread just moved to a terminal state.

        From another thread (a kill, a stop, an awaiter gone on a foreign
        loop) the token goes to the loop with a drain queued before this
        returns, not through ``_complete``'s flag: a worker may have set
        ``_drain_scheduled`` and not yet queued its drain (the GIL can switch
        between the two lines), and then whatever the killer puts on the loop
        next (a stats read, a check) would run first and see a KILLED token
        not yet settled. A lock makes "queued" mean queued; one drain serves
        a whole ``kill_operation`` burst. Not a hot path.
        """
        if threading.get_ident() == self._loop_thread_id:
            self._finalize(token)
            return
        with self._posted_lock:
            self._done.append(token)
            if self._posted_queued:
                return  # a drain queued before this append will take it
            try:
                self._loop.call_soon_threadsafe(self._drain_posted)  # type: ignore[union-attr]
            except RuntimeError:  # loop closed: the coordinator is gone; nobody can await
                return
            self._posted_queued = True

    def _drain_posted(self) -> None:
        """The drain ``_post_settle`` queued. Thread: loop."""
        with self._posted_lock:
            # Reset before draining: a settle posted after this queues a drain of its own.
            self._posted_queued = False
        self._drain_done()

    def _drain_done(self) -> None:
        """Settle up to ``DRAIN_CHUNK`` completed tokens, then yield the loop if more wait. Thread: loop.

        Scheduled by ``_complete``. A burst of thousands of completions is
        settled in chunks, each its own loop callback: other tasks (an HTTP
        request, a timer) run between chunks instead of waiting for the whole
        burst, and the awaiters' callbacks of one chunk run (and free their
        handles) before the next chunk is settled, which keeps the objects
        alive at once, and so the garbage collector's work, small.
        """
        # Reset the flag before popping: a worker that appends after our last
        # pop sees False and schedules another drain (see _complete).
        self._drain_scheduled = False
        more = self._settle_done(DRAIN_CHUNK)
        if self._done_paced and self._settle_paced(PACED_CHUNK):
            more = True
        if more and not self._drain_scheduled:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain_done)  # type: ignore[union-attr]

    def _settle_paced(self, limit: int) -> bool:
        """Settle up to *limit* long calls' tokens (0: all), releasing their workers; True if more wait. Thread: loop.

        A few per loop pass: a wave of long calls ending together is answered
        a few at a time, with the loop's sockets read between the slices, so a
        request that arrives meanwhile waits for a slice, not for the wave.
        """
        pop = self._done_paced.popleft
        budget = limit or -1
        n = 0
        while budget:
            budget -= 1
            try:
                token, worker = pop()
            except IndexError:
                break
            try:
                n += self._settle_token(token)
            finally:
                worker.settled.set()
        if n:
            self._rate.add(n)
        return not budget and bool(self._done_paced)

    def _settle_all(self) -> None:
        """Settle every completion waiting for the loop (at stop). Thread: loop."""
        self._settle_done(0)
        self._settle_paced(0)

    def _settle_done(self, limit: int) -> bool:
        """Settle up to *limit* completed tokens (0: all of them); return True if more are waiting. Thread: loop.

        Nothing one token's outcome or hooks do can stop the others of the
        chunk from settling: a failure here settles that token with a
        :class:`~tokengate.errors.SettlementFailed` and moves on.
        """
        pop = self._done.popleft
        settle = self._settle_token
        n = 0
        budget = limit or -1  # counts down to 0; -1 never reaches it
        while budget:
            budget -= 1
            try:
                token = pop()
            except IndexError:
                break
            n += settle(token)
        if n:
            self._rate.add(n)
        return not budget and bool(self._done)

    def _settle_token(self, token: TaskToken[Any]) -> int:
        """Settle one completed token; 1 if it settled now, 0 if not (late, or retried). Thread: loop.

        Never raises: a failure settles the token with a SettlementFailed.
        """
        try:
            is_error = token._run_error
            if token._finalized:
                if is_error is not None:
                    self._abandoned += 1  # a late completion after a timeout or stop
                    token._run_outcome = token._run_error = None
                return 0
            if token._tstate is _EXECUTING and is_error is not None:
                token._outcome = outcome = token._run_outcome
                token._is_error = is_error
                token._run_outcome = token._run_error = None
                plan = token._plan
                # after_run hooks (retries) judge the function's own exception...
                if plan.after_run and self._retry_wanted(token, plan):
                    return 0
                # ...awaiters and on_settle hooks get one a Future can carry.
                if is_error and isinstance(outcome, _UNDELIVERABLE):
                    token._outcome = deliverable_exception(outcome)
                # Once EXECUTING, a token's state is changed only on this (the
                # loop) thread, so no lock is needed for this last move.
                token._tstate = _FAILED if token._is_error else _COMPLETED
            self._finalize(token)
            return 1
        except BaseException as exc:  # noqa: BLE001 - settlement must not abandon the chunk
            self._settle_failed(token, exc)
            return 1

    def _retry_wanted(self, token: TaskToken[Any], plan: _Plan) -> bool:
        """Ask the after_run hooks; schedule a retry and return True if one asks for it. Thread: loop."""
        delay = None
        for p in plan.after_run:
            try:
                d = p.after_run(token)
            except Exception:
                logger.exception("policy %s failed in after_run", p.name)
                continue
            except BaseException:  # noqa: BLE001 - a hook must not change the call's outcome
                logger.exception("policy %s raised a BaseException in after_run", p.name)
                continue
            if d is not None and delay is None:
                delay = d
        # No further attempt for a call nobody waits for any more (its awaiter
        # was cancelled: the client went away), nor while stopping.
        if (delay is None or token._awaiter_gone or self._phase != "running"
                or not token._transition(_S.WAITING, _FROM_EXECUTING)):
            return False
        self._schedule_retry(token, plan, delay)
        return True

    def _settle_failed(self, token: TaskToken[Any], exc: BaseException) -> None:
        """Settling *token* raised *exc* (a bug, or a hook or outcome that misbehaves): release its awaiters anyway.

        Thread: loop. The token ends in a terminal state (FAILED if it had not
        reached one) with a ``SettlementFailed`` whose ``__cause__`` is *exc*,
        unless its outcome was already published.
        """
        logger.error("coordinator %s: settling token %s failed; it settles with SettlementFailed",
                     self.name, token.token_id, exc_info=exc)
        if token._published:
            return
        with self._state_lock:
            if token._tstate not in _TERMINAL:
                token._tstate = _FAILED
        error = SettlementFailed(
            f"token {token.token_id} ({token.operation_type}) could not be settled normally: "
            f"{describe_exception(exc)}", token_id=token.token_id)
        error.__cause__ = exc
        token._outcome, token._is_error = error, True
        if not token._finalized:
            try:
                self._finalize(token)
                return
            except BaseException:  # noqa: BLE001 - fall through to the bare minimum
                logger.exception("coordinator %s: finalizing token %s failed again", self.name, token.token_id)
        self._live.pop(token._seq, None)
        self._publish(token)

    def _schedule_retry(self, token: TaskToken[Any], plan: _Plan, delay: float) -> None:
        self._retries += 1
        token.attempt += 1
        token._outcome, token._is_error = None, False
        token.started_at = token.finished_at = None
        loop = self._loop
        assert loop is not None
        self._backoffs[token._seq] = loop.call_later(max(0.0, delay), self._readmit, token, plan)

    def _readmit(self, token: TaskToken[Any], plan: _Plan) -> None:
        """A retry goes back through admission: policies may refuse or hold it. Thread: loop."""
        self._backoffs.pop(token._seq, None)
        # Also while stopping: the retry was scheduled before the stop began, and a
        # graceful stop waits for accepted work (no new retries are scheduled then).
        if token._tstate is not _S.WAITING or self._phase == "stopped":
            return
        if token._awaiter_gone:  # cancelled during the backoff but not killed (a race): no new attempt
            self._kill_token(token, TokenKilled(
                f"token {token.token_id} ({token.operation_type}) was killed before its retry: "
                "its awaiter was cancelled", token_id=token.token_id, reason="awaiter cancelled"))
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
        if self._backoffs:  # settled during a retry backoff: drop the timer's reference now
            backoff = self._backoffs.pop(token._seq, None)
            if backoff is not None:
                backoff.cancel()
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
                self._run_timed += 1
        # The state goes in as its string value: a row of plain strings and
        # numbers is untracked by the garbage collector at its first pass,
        # where an enum member would keep every row tracked and scanned.
        self._history.append((
            token._seq, token.operation_type, state._value_, token.weight, qw, rt, token.core_id, token.worker_id,
            token.attempt, now, type(token._outcome).__name__ if token._is_error else None,
        ))
        plan = token._plan
        if plan is not None:
            hooks = plan.on_settle_for[state]
            if hooks:
                self._run_settle_hooks(token, plan)
        self._live.pop(token._seq, None)
        token._guarded = token._args = token._kwargs = token._context = token._run_outcome = None
        self._publish(token)

    def _publish(self, token: TaskToken[Any]) -> None:
        """Resolve the token's future and wake its waiters; never raises. Thread: loop."""
        try:
            if token._loop is self._loop:
                if not token.done():  # the awaiter may have cancelled it
                    if token._is_error:
                        token._resolve_future()
                    else:
                        _future_set_result(token, token._outcome)
            else:
                self._resolve_foreign(token)
        except BaseException as exc:  # noqa: BLE001 - e.g. an outcome the Future refuses
            token._fail_future(exc)
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
            except BaseException:  # noqa: BLE001 - a hook must not stop the others' releases
                logger.exception("policy %s raised a BaseException in on_settle", p.name)

    def _resolve_foreign(self, token: TaskToken[Any]) -> None:
        # The token was created on another event loop (standalone mode called
        # from async code): its future must be resolved on that loop's thread.
        try:
            token.get_loop().call_soon_threadsafe(token._resolve_future)
        except RuntimeError:  # that loop is closed; no one can await the token there
            pass

    def _kill_token(self, token: TaskToken[Any], exc: TokenKilled, *, any_state: bool = False) -> bool:
        token.kill_reason = exc.reason
        with self._router.lock:
            ok = token._transition_settling(_S.KILLED, exc, None if any_state else _NOT_STARTED)
            if ok:
                token._plan.router.forget_waiting(token)
        if ok:
            self._post_settle(token)
        return ok

    def _abandon(self, token: TaskToken[Any]) -> None:
        """The awaiter of *token* was cancelled: kill it if it has not started, and retry it no more."""
        token._awaiter_gone = True
        if token._tstate in _NOT_STARTED and self._phase != "stopped":
            self._kill_token(token, TokenKilled(
                f"token {token.token_id} ({token.operation_type}) was killed: its awaiter was cancelled",
                token_id=token.token_id, reason="awaiter cancelled"))
