"""The process lane's worker: routed calls run in a worker process, pipelined from the event loop.

Each :class:`ProcessWorker` is an ordinary routed worker (a bounded mailbox, in
a weight-class domain, behind the same bulkheads) that owns one
:class:`~tokengate.lanes.process.ChildProcess` for life. So admission, policies,
pending queues, sticky pins, kill, timeout, drain and statistics are shared with
the thread lane, and a sticky key pins to one *process*, whose caches are then
really reused.

**Where the work happens.** The calls travel on the coordinator's event loop,
not on the worker's thread: when tokens reach the mailbox the loop claims them
(→ EXECUTING), pickles them by reference (module and qualified name) in batches
of up to :data:`GROUP` per message and writes them to the process's pipe
without waiting for earlier replies (up to :data:`FAST_DEPTH` calls in flight
while a function's calls are known to be quick, :data:`SLOW_DEPTH` while they
are slow or not yet measured, so slow
calls do not queue behind each other in one process while a sibling idles).
**Slow calls are pulled**: the last call waiting is not sent ahead behind a
running one, and a process with fewer than :data:`SLOW_DEPTH` calls in flight
and nothing of its own takes the newest call waiting in another domain's
mailbox (:meth:`~tokengate.routing.Router.steal_across`: only a class it may
run, never a call a policy routes), so whichever process frees a slot first
takes the next call, as a shared queue would give it.
The child answers each call on its own as soon as it is done, and the loop,
reading the pipe when it is readable (:class:`~tokengate.lanes._link.Link`),
settles them in bursts. One call costs two hand-offs (loop → process → loop),
a burst one write and a few reads for many calls. The worker's thread only
starts and replaces the process (blocking work the loop must not do): a
crashed, terminated or recycled process is replaced in the background, while
the calls meant for it wait in its mailbox.

**Kill, timeout, crash.** Each call in flight has a slot in a small array
shared with its process (see :mod:`tokengate.lanes._child`): the parent marks
it QUEUED, the child marks it RUNNING under a shared lock before it starts and
DONE before it replies. :meth:`ProcessWorker.interrupt` (``kill()``, a
``timeout``, ``stop()`` past its grace) marks a QUEUED call SKIP under that lock
(the child never runs it; the token settled at once), or ends the process if the
call is RUNNING (SIGTERM, SIGKILL after ``terminate_grace``), or does nothing
(returns False) if it is DONE: its reply is on the way. When a process dies,
the loop first reads every reply still in the pipe (those calls settle with
their results), then fails the call that was RUNNING with
:class:`~tokengate.errors.WorkerCrashed` (or ``WorkerTerminated`` when it was
ended on purpose), and keeps the calls the child had not started, still
claimed: they are sent to the replacement first, and run exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pickle
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque

from ..errors import WorkerCrashed, WorkerTerminated
from ..states import TokenState
from ..worker import Worker
from ._child import CALL, CHUNK, DONE, MANY_ARGS, PROTOCOL, QUEUED, RUNNING, SKIP, SKIPPED, SLOTS, BATCH
from ._link import Link
from .base import LaneWorker
from ._outcomes import Batch, decode, pickling_failed

if TYPE_CHECKING:
    from ..coordinator import OperationsCoordinator
    from ..token import TaskToken
    from .process import ChildProcess
    from .references import FunctionRef

__all__ = ["ProcessWorker", "GROUP", "FAST_DEPTH", "SLOW_DEPTH"]

logger = logging.getLogger("tokengate.lanes")

#: Calls per message to a process.
GROUP = 64
#: Calls in flight to one process while the next call's function is known to be quick.
FAST_DEPTH = 512
#: Calls in flight to one process once its calls are slow: the next one is there when the current ends,
#: and the rest stay in the mailbox, where an idle sibling may still take them.
SLOW_DEPTH = 2
#: A function whose calls take longer than this (moving average of the time each reply took) is "slow".
SLOW_SECONDS = 0.001

_EXECUTING = TokenState.EXECUTING
_ADMITTED = frozenset({TokenState.ADMITTED})
_perf = time.perf_counter
_dumps = pickle.dumps
_loads = pickle.loads


class _Call:
    """One claimed call on its way to a process (or waiting to be re-sent to the next one)."""

    __slots__ = ("token", "ref", "key", "request", "slot", "link", "sent_at", "cancelled", "dropped")

    def __init__(self, token: TaskToken[Any], ref: FunctionRef, key: Any, request: tuple[Any, ...]) -> None:
        self.token = token
        self.ref = ref
        self.key = key  # what its service time is averaged under (see ProcessWorker._took)
        self.request = request
        self.slot = -1
        self.link: Link | None = None   # the process it was sent to; None while it waits to be re-sent
        self.sent_at = 0.0
        self.cancelled = False          # killed or timed out while waiting to be re-sent: never send it
        # Map chunks only: items whose arguments did not pickle, by index, and the indices that travelled.
        self.dropped: tuple[dict[int, BaseException], list[int]] | None = None


def _copy_death(error: BaseException) -> BaseException:
    if isinstance(error, WorkerCrashed):
        return WorkerCrashed(str(error), pid=error.pid, exitcode=error.exitcode, signal_name=error.signal_name)
    if isinstance(error, WorkerTerminated):
        return WorkerTerminated(str(error), pid=error.pid, reason=error.reason)
    return error


class ProcessWorker(LaneWorker):
    """A routed worker whose calls run in the worker process it owns (see the module docstring)."""

    __slots__ = ("child", "options", "warm", "attached", "_link", "_calls", "_where", "_resend", "_free",
                 "_pump_scheduled", "_ask", "_starting", "_draining", "_took", "_last_reply", "_timer", "stolen")

    kind = "p"

    def __init__(self, coordinator: OperationsCoordinator, core_id: int, index: int, options: dict[str, Any],
                 warm: bool) -> None:
        super().__init__(coordinator, core_id, index)
        # The handle is made on the worker's thread when it starts (see
        # _thread_started): a coordinator that never starts holds no socket.
        self.child: ChildProcess = None  # type: ignore[assignment]
        self.options = options
        self.warm = warm
        # Set once a process is attached to the loop: its calls can be sent at once. Until then a
        # call routed here waits in the mailbox, where an attached sibling may pull it (see ready).
        self.attached = threading.Event()
        # Loop thread only, except where noted.
        self._link: Link | None = None             # the attached process, None while (re)starting
        self._calls: dict[int, _Call] = {}          # in flight, by slot, in the order they were sent
        self._free: list[int] = list(range(SLOTS - 1, -1, -1))
        self._resend: Deque[_Call] = collections.deque()  # claimed, not started by a process that died
        # token -> its call: written under current_lock (interrupt() reads it from any thread).
        self._where: dict[TaskToken[Any], _Call] = {}
        self._pump_scheduled = False
        self._ask: str | None = None      # for the worker's thread: "start" or "restart"; under current_lock
        self._starting = False            # a start was asked for and has not attached yet
        self._draining: str | None = None  # due for recycling: send nothing more, replace once empty
        # Per function (its GuardedFunction: a map's chunks have their own), how long its replies
        # take (see _on_frames); a function not yet measured counts as slow.
        self._took: dict[Any, float] = {}
        self._timer: asyncio.TimerHandle | None = None  # a pump planned to steal from a stuck sibling
        self._last_reply = 0.0
        self.stolen = 0  # calls taken from another domain's mailbox (see _steal_across)

    # ------------------------------------------------------------ thread side

    def _thread_started(self) -> None:
        from .process import ChildProcess

        self.child = ChildProcess(name=f"{self.coordinator.name}-{self.worker_id}", **self.options)
        # Warm start: each worker starts its process on its own thread, so all
        # of a lane's processes start in parallel and off the request path.
        if self.warm:
            self._starting = True
            self._start("start")
        else:
            self._go_idle()  # the first call routed here asks for the process...
            self.wake()      # ...or one routed before this thread ran

    def _go_idle(self) -> None:
        self.idle = True
        for weight in self.classes:
            self.router.idle_hint[weight] = True

    def _loop(self) -> None:
        # The thread only starts and replaces the process; calls travel on the loop.
        while True:
            self._park.acquire()
            if self.stopping:
                return
            with self.current_lock:
                ask, self._ask = self._ask, None
            if ask is not None:
                self._start(ask)

    def _start(self, ask: str) -> None:
        error: BaseException | None = None
        try:
            if ask == "restart":
                self.child.restart(self._draining or "replacement")
            else:
                self.child.start()
        except Exception as exc:  # noqa: BLE001 - the calls waiting for it get the error
            logger.warning("%s: worker process failed to start: %s", self.worker_id, exc)
            error = exc
        if not self._on_loop(self._attach, error):
            self._starting = False  # no loop (yet): the next pump asks again

    def start_process(self) -> None:
        """Start this worker's process now if it is not running (on the worker's thread)."""
        self._ask_thread("start")

    def _ask_thread(self, ask: str) -> None:
        with self.current_lock:
            self._ask = ask
        Worker.wake(self)

    def _thread_exiting(self) -> None:
        done = threading.Event()

        def detach() -> None:
            if self._timer is not None:
                self._timer.cancel()
            link, self._link = self._link, None
            if link is not None:
                link.detach()
            done.set()

        if self._on_loop(detach):
            done.wait(2.0)  # the pipe's fd must leave the loop's selector before it is closed
        if self.child is not None:
            self.child.close(timeout=0.0)

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> bool:
        """Run *fn* on the coordinator's loop (now, if this is the loop thread); False if there is no loop."""
        coordinator = self.coordinator
        loop: asyncio.AbstractEventLoop | None = coordinator._loop
        if loop is None or loop.is_closed():
            return False
        try:
            if threading.get_ident() == coordinator._loop_thread_id:
                loop.call_soon(fn, *args)
            else:
                loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed meanwhile
            return False
        return True

    def wake(self) -> None:
        """Tokens arrived (or the worker is stopping): pump on the loop. Thread: any (the router's).

        On the loop thread, with nothing in flight, the first token is sent at
        once (a lone call then costs no extra loop iteration); the rest of a
        burst waits for the pump, one loop iteration later, and goes in batches.
        """
        if self.stopping:
            Worker.wake(self)
        elif (threading.get_ident() == self.coordinator._loop_thread_id and not self._calls
              and self._link is not None and self._draining is None and not self._resend):
            self._send_first()
        self._schedule_pump()

    def _schedule_pump(self) -> None:
        """Pump on the loop soon, unless a pump is already scheduled. Thread: any."""
        if not self._pump_scheduled:
            self._pump_scheduled = True
            if not self._on_loop(self._pump):
                self._pump_scheduled = False

    # -------------------------------------------------------------- loop side

    def _attach(self, error: BaseException | None) -> None:
        self._starting = False
        if self.stopping:
            return
        if error is not None:
            self._fail_waiting(error)
            return
        if self._link is None:
            try:
                fd, wfd, sentinel, states, lock, pid = self.child.endpoints()
            except Exception as exc:  # noqa: BLE001 - closed or dead meanwhile: try again at the next call
                self._fail_waiting(exc)
                return
            loop = self.coordinator._loop
            assert loop is not None
            self._link = Link(loop, fd, wfd, sentinel, states, lock, pid, self._on_frames, self._on_dead)
            self._free = list(range(SLOTS - 1, -1, -1))
            self._draining = None
            self.attached.set()
        self._pump()

    def _fail_waiting(self, error: BaseException) -> None:
        """The process could not start: the calls waiting for it (re-sends, the mailbox) fail with *error*."""
        failed: list[_Call] = []
        with self.current_lock:
            while self._resend:
                call = self._resend.popleft()
                self._where.pop(call.token, None)
                if not call.cancelled:
                    failed.append(call)
                else:
                    self.finished += 1
        for call in failed:
            self._settle(call, error, True)
        while True:
            try:
                token = self.mailbox.popleft()
            except IndexError:
                break
            claimed = self._claim(token)
            if claimed is not None:
                with self.current_lock:
                    self._where.pop(token, None)
                self._settle(claimed, error, True)
        self._flush()
        self._go_idle()

    def _pump(self) -> None:
        """Send what the mailbox (and the pending queues) hold, as far as the depth allows. Thread: loop."""
        self._pump_scheduled = False
        if self.stopping:
            return
        link = self._link
        if link is None or self._draining is not None:
            if link is None and not self._starting and (self.mailbox or self._resend
                                                         or self.router.has_work_for(self)):
                self._starting = True
                self._ask_thread("start")
            return
        calls = self._calls
        mailbox = self.mailbox
        refill = self.coordinator._refill
        group: list[_Call] = []
        left = self.child.calls_left()  # max_calls_per_process: never send a process more than it may run
        took = self._took
        while True:
            room = FAST_DEPTH - len(calls)
            if left is not None:
                room = min(room, left - len(calls))
            while room > 0 and self._resend:
                with self.current_lock:
                    call = self._resend.popleft()
                    if call.cancelled:
                        self._where.pop(call.token, None)
                        self.finished += 1
                        continue
                    self._assign(call, link)
                group.append(call)
                room -= 1
            while room > 0:
                try:
                    token = mailbox.popleft()
                except IndexError:
                    # Nothing of its own: the pending queues (and a stuck sibling of its
                    # domain), then, while this process is nearly free, another domain's
                    # mailbox: calls are pulled by whichever process frees a slot first.
                    if refill(self) or (len(calls) < SLOW_DEPTH and self._steal_across()):
                        continue
                    break
                estimate = took.get(token._guarded, 1.0)
                if estimate > SLOW_SECONDS and calls and (len(calls) >= SLOW_DEPTH or self._last_waiting()):
                    # Slow (or not yet measured): it waits in the mailbox, where an idle
                    # process may still take it, until this process is nearly free; and
                    # the last call waiting is not sent ahead at all: whichever process
                    # frees first takes it, so a process the host slows is not the last to end.
                    mailbox.appendleft(token)
                    room = 0
                    break
                claimed = self._claim(token)
                if claimed is None:
                    continue
                with self.current_lock:
                    self._assign(claimed, link)
                room -= 1
                if claimed.request[0] != CALL:  # a map chunk travels alone: the child starts on it at once
                    self._ship(group, link)
                    self._ship([claimed], link)
                    group = []
                    continue
                group.append(claimed)
                if len(group) >= GROUP:
                    self._ship(group, link)
                    group = []
            if group:
                self._ship(group, link)
                group = []
            if room <= 0:
                self.idle = False  # full: the replies' handler pumps again
                break
            # Go idle, then look again: a router that queued a token and saw
            # idle == False has woken us already; one that saw True wakes us.
            self._go_idle()
            if mailbox or self._resend or self.router.has_work_for(self):
                self.idle = False
                continue
            self._plan_steal()
            break
        self._set_current()

    def _last_waiting(self) -> bool:
        """Just popped from the mailbox, is that call the last one waiting in this lane? Thread: loop."""
        router = self.router
        return not (self.mailbox or router.pending_total or router.queued_elsewhere(self))

    def _steal_across(self) -> bool:
        """Take one call waiting in another domain's mailbox (see Router.steal_across). Thread: loop."""
        router = self.router
        if not router.queued_elsewhere(self):  # the common case, without the lock
            return False
        with router.lock:
            if router.steal_across(self) is None:
                return False
        self.stolen += 1
        return True

    def _plan_steal(self) -> None:
        # The thread lane's parked worker wakes when a sibling's call would count as
        # stuck, to take the calls queued behind it; here a timer pumps then instead.
        wait = self.coordinator._steal_wait(self)
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if wait is not None:
            loop = self.coordinator._loop
            assert loop is not None
            self._timer = loop.call_later(wait, self._pump)

    def _send_first(self) -> None:
        # The caller (the router) holds the routing lock: nothing here settles a token
        # (settling runs hooks that may route). A call whose arguments do not pickle
        # waits for the pump, which fails it outside the lock.
        link = self._link
        assert link is not None
        try:
            token = self.mailbox.popleft()
        except IndexError:
            return
        call = self._claim(token)
        if call is None:
            return
        with self.current_lock:
            self._assign(call, link)
        try:
            payload = _dumps([call.request], PROTOCOL)
        except Exception:  # noqa: BLE001 - the pump sends it again and fails it there
            with self.current_lock:
                del self._calls[call.slot]
                self._free.append(call.slot)
                call.link = None
                self._resend.appendleft(call)
            return
        call.sent_at = _perf()
        link.send(_dumps((BATCH, [call.slot], payload), PROTOCOL))
        self._set_current()

    def _claim(self, token: TaskToken[Any]) -> _Call | None:
        guarded, args, kwargs = token._guarded, token._args, token._kwargs
        if guarded is None or args is None or kwargs is None:
            self.finished += 1
            return None
        ref = guarded.reference
        assert ref is not None  # set at decoration for every process-lane function
        if guarded.map_of is not None:
            request: tuple[Any, ...] = (MANY_ARGS, ref.module, ref.qualname, args[0])
        else:
            request = (CALL, ref.module, ref.qualname, args, dict(kwargs) if kwargs else None)
        call = _Call(token, ref, guarded, request)
        with self.current_lock:
            if not token._transition(_EXECUTING, _ADMITTED):
                self.finished += 1
                return None
            self._where[token] = call
        token.worker_id = self.worker_id
        token.core_id = self.core_id
        token.started_at = _perf()
        return call

    def _assign(self, call: _Call, link: Link) -> None:
        # Caller holds current_lock. The child looks at the slot only after it got the call.
        slot = self._free.pop()
        link.states[slot] = QUEUED
        call.slot = slot
        call.link = link
        self._calls[slot] = call

    def _ship(self, group: list[_Call], link: Link) -> None:
        if not group:
            return
        try:
            payload = _dumps([call.request for call in group], PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - find the call(s) whose arguments do not pickle
            if len(group) > 1:
                for call in group:
                    self._ship([call], link)
                return
            call = group[0]
            if call.request[0] == CALL or not self._drop_unpicklable(call):
                self._unsent(call, pickling_failed(call.ref, "arguments", exc))
                return
            payload = _dumps([call.request], PROTOCOL)
        now = _perf()
        for call in group:
            call.sent_at = now
        link.send(_dumps((BATCH, [call.slot for call in group], payload), PROTOCOL))

    def _drop_unpicklable(self, call: _Call) -> bool:
        """A chunk that does not pickle: keep the items that do; True if some do."""
        kind, module, qualname, items = call.request
        dropped: dict[int, BaseException] = {}
        kept: list[int] = []
        for index, item in enumerate(items):
            try:
                _dumps(item, PROTOCOL)
            except Exception as exc:  # noqa: BLE001
                dropped[index] = pickling_failed(call.ref, "arguments", exc)
            else:
                kept.append(index)
        if not kept:
            return False
        call.request = (kind, module, qualname, [items[i] for i in kept])
        call.dropped = (dropped, kept)
        return True

    def _unsent(self, call: _Call, error: BaseException) -> None:
        # A call that never reached the process: its slot is free again at once.
        del self._calls[call.slot]
        self._free.append(call.slot)
        with self.current_lock:
            self._where.pop(call.token, None)
        self._settle(call, error, True)
        self._flush()

    def _settle(self, call: _Call, value: Any, is_error: bool) -> None:
        token = call.token
        finished = token.finished_at = _perf()
        self.executed += 1
        self.finished += 1
        token._run_outcome = value
        token._run_error = is_error
        # On the loop already: queue it for settling, and _flush() settles the burst in this
        # callback (no call_soon_threadsafe, no self-pipe wake-up, no extra loop iteration).
        self.coordinator._done.append(token)

    def _flush(self) -> None:
        coordinator = self.coordinator
        if coordinator._done:
            coordinator._drain_done()

    def _on_frames(self, frames: list[bytes], pump: bool = True) -> None:
        """Replies arrived: settle their calls, count them, send more (with *pump*). Thread: loop."""
        calls = self._calls
        free = self._free
        done: list[tuple[_Call, Any, bool]] = []
        resend_one: list[_Call] = []
        now = _perf()
        took_by = self._took
        last = self._last_reply
        with self.current_lock:
            for data in frames:
                slot = int.from_bytes(data[:4], "big", signed=True)
                if slot < 0:  # a batch that did not unpickle in the child: nothing of it ran
                    resend_one += self._unloadable(data, done)
                    continue
                call = calls.pop(slot, None)
                if call is None:
                    continue
                free.append(slot)
                self._where.pop(call.token, None)
                took = now - (call.sent_at if call.sent_at > last else last)
                last = now
                # Down at once (a first call that imported modules must not mark a quick
                # function slow for long), up gradually (one slow call is not a slow function).
                average = took_by.get(call.key)
                took_by[call.key] = took if average is None or took < average else average + (took - average) * 0.2
                self.busy_time += took
                try:
                    item = _loads(memoryview(data)[4:])
                except Exception as exc:  # noqa: BLE001 - the reply does not unpickle here
                    done.append((call, pickling_failed(call.ref, "result", exc), True))
                    continue
                kind = item[0]
                if kind == SKIPPED:
                    self.finished += 1
                elif kind == CHUNK:
                    done.append((call, self._batch(call, item[1], item[2]), False))
                else:
                    outcome = decode(call.ref, item)
                    done.append((call, outcome.value, False) if outcome.ok else (call, outcome.error, True))
        self._last_reply = last
        link = self._link
        for call in resend_one:
            if link is not None:
                self._ship([call], link)
        due = self.child.count_calls(len(done), bool(calls))
        if due is not None and self._draining is None:
            self._draining = due
        if self._draining is not None and not calls and link is not None:
            # Recycle: nothing in flight; the worker's thread replaces the process.
            link.detach()
            self._link = None
            self._starting = True
            self._ask_thread("restart")
        if pump and (self.mailbox or self._resend):
            # More calls wait here: send them before settling, so the process works while the loop settles.
            self._pump()
            pump = False
        for call, value, is_error in done:
            self._settle(call, value, is_error)
        if done:
            self._flush()
        if pump:
            # Nothing waits here: the settled calls' awaiters run first, and the next call of a
            # sequence goes out at once from wake() (idle: the router wakes us); the pump
            # (pending queues, the pull) follows them in this loop round.
            if not calls:
                self.idle = True
            self._schedule_pump()

    def _unloadable(self, data: bytes, done: list[tuple[_Call, Any, bool]]) -> list[_Call]:
        """A batch the child could not unpickle (nothing of it ran). Under current_lock.

        Its calls are re-sent one by one (returned); a call that was alone fails (added to *done*).
        """
        item = _loads(memoryview(data)[4:])
        slots = item[-1]
        if len(slots) > 1:
            return [self._calls[s] for s in slots if s in self._calls]
        call = self._calls.pop(slots[0], None)
        if call is not None:
            self._free.append(call.slot)
            self._where.pop(call.token, None)
            done.append((call, decode(call.ref, item[:-1]).error, True))
        return []

    def _batch(self, call: _Call, values: list[Any], errors: dict[int, Any]) -> Batch:
        ref = call.ref
        decoded = {i: decode(ref, e).error for i, e in errors.items()} if errors else {}
        batch = Batch(values, decoded)  # type: ignore[arg-type]
        if call.dropped is not None:  # put the items that never travelled back in their places
            dropped, kept = call.dropped
            size = len(kept) + len(dropped)
            full: list[Any] = [None] * size
            merged: dict[int, BaseException] = dict(dropped)
            for position, index in enumerate(kept):
                full[index] = values[position]
                if position in decoded:
                    merged[index] = decoded[position]  # type: ignore[assignment]
            batch = Batch(full, merged)
        return batch

    def _on_dead(self) -> None:
        """The process died: settle what it finished, fail what it was running, keep the rest for the next."""
        link = self._link
        if link is None:
            return
        frames = link.drain()
        if frames:
            self._on_frames(frames, pump=False)
        link.detach()
        self._link = None
        error = self.child.reap("a call")
        failed: list[_Call] = []
        with self.current_lock:
            for call in self._calls.values():
                state = link.states[call.slot]
                if state in (RUNNING, DONE):  # it ran (or was running): the death is its outcome
                    self._where.pop(call.token, None)
                    failed.append(call)
                elif state == SKIP:            # killed before it started: already settled
                    self._where.pop(call.token, None)
                    self.finished += 1
                else:                           # never started: it goes to the replacement, once
                    call.link = None
                    self._resend.append(call)
            self._calls = {}
        self._free = list(range(SLOTS - 1, -1, -1))
        self._draining = None
        for call in failed:
            if call.request[0] == CALL:
                self._settle(call, _copy_death(error), True)
            else:  # a map chunk: each of its items gets the death (as ChildProcess.call_batch gives them)
                size = len(call.request[3]) + (len(call.dropped[0]) if call.dropped is not None else 0)
                self._settle(call, Batch([None] * size, {i: _copy_death(error) for i in range(size)}), False)
        self._flush()
        self._set_current()
        if not self.stopping:
            self._starting = True
            self._ask_thread("restart")

    def _set_current(self) -> None:
        calls = self._calls
        self.current = next(iter(calls.values())).token if calls else None

    # ---------------------------------------------------------------- any thread

    def carries(self, token: TaskToken[Any]) -> bool:
        """True while *token* is claimed by this worker (in flight or waiting to be re-sent). Thread: any."""
        return token in self._where

    def interrupt(self, token: TaskToken[Any], reason: str) -> bool:
        """Stop *token*'s call: skip it if its process has not started it, else end the process.

        False when it is not in flight here or already finished (its reply is on
        the way). Thread: any.
        """
        with self.current_lock:
            call = self._where.get(token)
            if call is None:
                return False
            link = call.link
            if link is None:  # waiting to be re-sent: it never will be
                call.cancelled = True
                return True
            signalled = False
            if not link.lock.acquire(timeout=0.2):
                state = RUNNING  # a process that died holding the lock: treat the call as running
            else:
                try:
                    state = link.states[call.slot]
                    if state == QUEUED:
                        link.states[call.slot] = SKIP
                    elif state == RUNNING:
                        # Signalled while we hold the lock the child needs to start its
                        # next call: the signal is pending before that call can begin,
                        # and a fatal signal also ends a child blocked on the lock. Sent
                        # after the release, it could end the next (innocent) call.
                        signalled = self.child.signal_end(reason)
                finally:
                    link.lock.release()
            if state == QUEUED:
                return True
            if state != RUNNING:
                return False
            pid = link.pid
        if not signalled:
            self.child.signal_end(reason)
        self._on_loop(self._escalate_later, pid, reason)
        return True

    def _escalate_later(self, pid: int, reason: str) -> None:
        loop = self.coordinator._loop
        assert loop is not None
        loop.call_later(self.child._grace, self._escalate, pid, reason)

    def _escalate(self, pid: int, reason: str) -> None:
        link = self._link
        if link is not None and link.pid == pid:
            self.child.signal_end(reason, kill=True)

    @property
    def ready(self) -> bool:
        """True once this worker's process is up and attached to the loop (always True when processes start on demand).

        Attached, not just started: the process's pipe is read by the loop, so a
        call routed here now is sent at once (before that it would wait, and an
        idle sibling in another domain could pull it).
        """
        if not self.warm:
            return True
        return self.attached.is_set()

    def describe(self) -> dict[str, Any]:
        child = self.child
        return {"lane": "process", "stolen": self.stolen,
                "process": None if child is None else child.stats().as_dict()}
