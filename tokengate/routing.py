"""The router: places tokens in worker mailboxes by weight class, or queues them.

All state here is guarded by ``Router.lock`` (the routing lock). Workers read
their own mailbox without it (a deque pop is atomic), and the load estimate
``routed - finished`` is read racily on purpose: it only steers placement.

Placement for a token of class *w* (see :mod:`tokengate.topology`):

1. if a policy pinned it to a domain, only that domain's usable workers count;
2. otherwise walk *w*'s domains in preference order; within a domain a
   staggered position spreads ties over its active workers; the first idle
   worker wins (front/back fill), else the least-loaded worker whose mailbox
   has room;
3. if every usable mailbox is full (or admission is paused) the token waits
   in *w*'s pending queue (or its pinned domain's queue) in FIFO order;
   workers pull from those queues when their mailbox runs dry. Past
   ``max_pending`` the call is refused with ``Overloaded``.

Cost per token is a handful of integer comparisons per usable worker,
independent of how many tokens are queued.

Placed tokens move only under the lock: an idle worker takes one from a
sibling stuck on a long call (``steal``, same domain), and the process lane
pulls one from another domain's mailbox (``steal_across``: a class the taker
may run, never a token a policy routes).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque

from .errors import Overloaded
from .states import TokenState
from .tags import WEIGHTS
from .topology import RoutingTable
from .worker import Worker

if TYPE_CHECKING:
    from .coordinator import OperationsCoordinator
    from .token import TaskToken

__all__ = ["Router", "Core"]

_WAITING = TokenState.WAITING
_CREATED = TokenState.CREATED
_ADMITTED = TokenState.ADMITTED
_ENTRY = frozenset({TokenState.CREATED, TokenState.WAITING})
_perf = time.perf_counter

# Where a WAITING token sits, so a kill or timeout can fix the pending counts.
NOWHERE, IN_PENDING, IN_CORE_PENDING, IN_HELD, IN_POLICY = 0, 1, 2, 3, 4


def _queued(worker: Worker) -> int:
    """Tokens in *worker*'s mailbox that are still to run, for statistics.

    A token killed, timed out or run inline while in a mailbox stays there until
    the worker pops and skips it; it must not be counted as queued meanwhile.
    """
    return sum(1 for token in list(worker.mailbox) if token._tstate is _ADMITTED)


def _movable(token: TaskToken[Any]) -> bool:
    """May *token* run on another domain than the one it was placed on? Not if a policy routes it."""
    plan = token._plan
    if plan is None or plan.pick_core or plan.on_routed:
        return False
    return token.policy_data is None or not plan.marked_routes


def _wake_first_idle(workers: list[Worker]) -> bool:
    """Wake the first idle worker of *workers*; False if none is idle. Caller holds the routing lock."""
    for worker in workers:
        if worker.idle:
            worker.idle = False
            worker.wake()
            return True
    return False


class Core:
    """A worker domain: its workers, active pattern, position counter and routed counts."""

    __slots__ = ("core_id", "workers", "active", "position", "routed", "usable", "pending")

    def __init__(self, core_id: int, workers: list[Worker]) -> None:
        self.core_id = core_id
        self.workers = workers
        self.active = len(workers)  # the "pattern": how many workers take new tokens
        self.position = 0
        self.routed: dict[str, int] = {w: 0 for w in WEIGHTS}
        self.usable: dict[str, list[Worker]] = {}
        self.pending: Deque[TaskToken[Any]] = collections.deque()  # tokens pinned here, waiting


class Router:
    """Routing state of one lane of a coordinator (cores, pending queues, holds)."""

    def __init__(
        self,
        coordinator: OperationsCoordinator,
        table: RoutingTable,
        mailbox_size: int,
        max_pending: int,
        *,
        lane: str = "thread",
        lock: threading.Lock | None = None,
        make_worker: Callable[[OperationsCoordinator, int, int], Worker] = Worker,
    ) -> None:
        self.coordinator = coordinator
        self.lane = lane
        self.table = table
        self.mailbox_size = mailbox_size
        self.max_pending = max_pending
        # The routing lock: guards everything below. The routers of all lanes
        # share one, so that a gate check and a state move are ordered across lanes.
        self.lock = lock if lock is not None else threading.Lock()
        self.cores: dict[int, Core] = {}
        for c in range(1, table.num_cores + 1):
            self.cores[c] = Core(c, [make_worker(coordinator, c, i) for i in range(table.workers_per_core)])
            for worker in self.cores[c].workers:
                worker.router = self
        self.class_cores: dict[str, list[Core]] = {w: [self.cores[c] for c in table.allowed[w]] for w in WEIGHTS}
        self.pending: dict[str, Deque[TaskToken[Any]]] = {w: collections.deque() for w in WEIGHTS}
        self.pending_count: dict[str, int] = {w: 0 for w in WEIGHTS}
        self.pending_total = 0
        self.peak_pending = 0
        self.held: dict[str, Deque[TaskToken[Any]]] = {}
        self.paused = False
        self.paused_ops: set[str] = set()
        # Per class: may some worker of the class be idle? Set by workers going
        # idle, cleared by a wake-up scan that found none (see _wake_one_idle).
        self.idle_hint: dict[str, bool] = {w: True for w in WEIGHTS}
        self._rebuild()

    @property
    def workers(self) -> list[Worker]:
        return [w for core in self.cores.values() for w in core.workers]

    def _rebuild(self) -> None:
        """Recompute usable workers after a pattern change. Caller holds the lock (or is __init__)."""
        table = self.table
        for core in self.cores.values():
            active = core.workers[: core.active]
            for w in WEIGHTS:
                low = 0 if w in table.owners[core.core_id] else min(table.reserve, len(core.workers))
                usable = active[low:]
                if not usable and w in table.owners[core.core_id]:
                    usable = active[:1]
                core.usable[w] = usable
        for core in self.cores.values():
            for worker in core.workers:
                owners = [w for w in WEIGHTS if w in table.owners[core.core_id] and worker in core.usable[w]]
                others = [
                    w for w in WEIGHTS
                    if w not in owners and core.core_id in table.allowed[w] and worker in core.usable[w]
                ]
                worker.classes = tuple(owners + others)
        for w in WEIGHTS:
            self.idle_hint[w] = True  # classes moved between workers: look again

    def set_active(self, core_id: int, active: int) -> None:
        """Set how many workers of *core_id* take new tokens (1..workers_per_core)."""
        with self.lock:
            core = self.cores[core_id]
            core.active = max(1, min(active, len(core.workers)))
            self._rebuild()
        for worker in self.cores[core_id].workers:
            worker.wake()

    # -- placement (caller holds the lock) -----------------------------------

    def choose(self, weight: str, pin: int | None) -> Worker | None:
        cap = self.mailbox_size
        best: Worker | None = None
        best_core: Core | None = None
        best_load = 1 << 62
        cores = self.class_cores[weight] if pin is None else [self.cores[pin]]
        for core in cores:
            usable = core.usable[weight]
            if pin is not None and not usable:
                usable = core.workers[: core.active]
            n = len(usable)
            start = core.position
            for i in range(n):
                worker = usable[(start + i) % n]
                load = worker.routed - worker.finished
                if load <= 0:
                    core.position = start + i + 1
                    return worker
                if load < best_load and len(worker.mailbox) < cap:
                    best, best_core, best_load = worker, core, load
        if best_core is not None:
            best_core.position += 1
        return best

    def place(self, token: TaskToken[Any], worker: Worker, *, from_pending: bool = False) -> bool:
        """Put *token* in *worker*'s mailbox (→ ADMITTED). False if the token was settled meanwhile.

        *from_pending*: the caller just took the WAITING token off a pending
        queue under the routing lock; every other move of a queued token (kill,
        timeout, refusal, an inline run) also happens under that lock, so the
        state needs no state-lock round trip.

        This is the single hand-off point from routing to an executor: a routed
        token goes to a worker's mailbox here, and only ``worker.run_token``
        runs it. A lane whose workers are processes (or a remote cluster) would
        provide its own ``Worker`` with the same mailbox/claim/complete contract.
        """
        if from_pending or token._tstate is _CREATED:
            # Not yet published to any other thread, or only reachable under
            # the routing lock we hold: no kill can race with us.
            token._tstate = _ADMITTED
        elif not token._transition(_ADMITTED, _ENTRY):
            return False
        token.admitted_at = _perf()
        core_id = worker.core_id
        token.core_id = core_id
        core = self.cores[core_id]
        core.routed[token.weight] += 1
        worker.routed += 1
        worker.mailbox.append(token)
        if worker.idle:
            worker.idle = False
            worker.wake()
        return True

    def enqueue_pending(self, token: TaskToken[Any], pin: int | None, *, refuse: bool) -> None:
        """Queue *token* as WAITING; raise Overloaded past max_pending when *refuse*."""
        weight = token.weight
        count = self.pending_count[weight]
        if refuse and count >= self.max_pending:
            raise Overloaded(
                f"{weight} pending queue is full ({count} of max_pending={self.max_pending}); "
                "retry later, or raise max_pending / add workers",
                operation_type=token.operation_type,
                weight=weight,
                pending=count,
                limit=self.max_pending,
            )
        if token._tstate is _CREATED:
            token._tstate = _WAITING  # still private to the submitting thread
        elif token._tstate is not _WAITING:
            token._force_transition(_WAITING)
        if pin is None:
            self.pending[weight].append(token)
            token._where = IN_PENDING
        else:
            token.core_id = pin
            self.cores[pin].pending.append(token)
            token._where = IN_CORE_PENDING
        self.pending_count[weight] = count + 1
        self.pending_total += 1
        if self.pending_total > self.peak_pending:
            self.peak_pending = self.pending_total
        if not self.paused:
            self._wake_one_idle(weight, pin)

    def _wake_one_idle(self, weight: str, pin: int | None) -> None:
        # The decision to queue was made on load figures that workers update
        # without this lock: by now every worker that may take the token can
        # have emptied its mailbox, found the queue empty and gone idle. Wake
        # one. (A worker re-checks the queues after setting ``idle``, see
        # has_work_for, so either it sees the token or we see it idle.)
        if pin is None:
            if not self.idle_hint[weight]:
                return
            for core in self.class_cores[weight]:
                if _wake_first_idle(core.usable[weight]):
                    return
            # Nobody of this class is idle: skip the scan until a worker of the
            # class goes idle again (it sets the hint before its re-check, so a
            # token queued before this point is seen by that re-check).
            self.idle_hint[weight] = False
        else:
            core = self.cores[pin]
            _wake_first_idle(core.workers[: core.active])

    def stuck_in(self, worker: Worker, stuck_after: float) -> float | None:
        """Seconds until a sibling of *worker* with tokens queued behind its running call counts as stuck.

        Only a queue whose last token *worker* may take counts (what ``steal``
        would take: a class of the worker's, or a token pinned to the domain);
        a bulkhead-reserved worker beside queues of another class sleeps until
        woken instead of polling every ``stuck_after`` seconds.
        ``<= 0`` when one already does; None when no sibling has such a queue
        (or *worker* is inactive: inactive workers do not steal). A sibling with
        a queue but between two calls counts as ``stuck_after`` away: its next
        call may block. A lock-free look: callers re-check under the lock (see
        steal).
        """
        core = self.cores[worker.core_id]
        if worker.index >= core.active:
            return None
        now = _perf()
        soonest: float | None = None
        classes = worker.classes
        for sibling in core.workers:
            if sibling is worker or not sibling.mailbox:
                continue
            try:
                last = sibling.mailbox[-1]  # what steal() would take
            except IndexError:  # emptied since the look above
                continue
            # A token this worker may not run (the bulkhead) cannot be stolen: waking up for
            # it every stuck_after seconds would only cost lock and GIL hand-offs.
            if last.weight not in classes and last._where != IN_CORE_PENDING:
                continue
            running = sibling.current
            started = running.started_at if running is not None else None
            if started is None:
                # Between two calls: it is about to start its next one, which may turn out to
                # be slow, and then nobody would wake us for what waits behind it. Look again.
                left = stuck_after
            else:
                left = stuck_after - (now - started)
            if soonest is None or left < soonest:
                soonest = left
        return soonest

    def has_work_for(self, worker: Worker) -> bool:
        """Is a queued token waiting that *worker* may take? A lock-free look, made before parking."""
        if self.paused or not self.pending_total:
            return False
        core = self.cores[worker.core_id]
        if core.pending and worker.index < core.active:
            return True
        counts = self.pending_count
        for weight in worker.classes:
            if counts[weight]:
                return True
        return False

    def forget_waiting(self, token: TaskToken[Any]) -> None:
        """Fix counts for a WAITING token that was just killed or timed out. Caller holds the lock."""
        where = token._where
        if where in (IN_PENDING, IN_CORE_PENDING):
            self.pending_count[token.weight] -= 1
            self.pending_total -= 1
            self._drop_stale()
        elif where == IN_HELD:
            held = self.held.get(token.operation_type)
            if held is not None:
                try:
                    held.remove(token)
                except ValueError:
                    pass
        token._where = NOWHERE

    def route(self, token: TaskToken[Any], pin: int | None, *, refuse: bool) -> Worker | None:
        """Place or queue *token*; return the worker it went to (None if it waits)."""
        op = token.operation_type
        if op in self.paused_ops:
            held = self.held.get(op)
            # Bounded like a pending queue: a paused operation must not grow memory without limit.
            count = 0 if held is None else len(held)
            if refuse and count >= self.max_pending:
                raise Overloaded(
                    f"operation {op!r} is paused and already holds {count} calls (max_pending={self.max_pending}); "
                    f"retry later, or resume({op!r})",
                    operation_type=op,
                    weight=token.weight,
                    pending=count,
                    limit=self.max_pending,
                )
            if token._tstate is not _WAITING:
                token._force_transition(_WAITING)
            self._hold(token)
            return None
        if self.paused or (pin is None and self.pending_count[token.weight]):
            self.enqueue_pending(token, pin, refuse=refuse)
            return None
        if pin is not None and self.cores[pin].pending:
            self.enqueue_pending(token, pin, refuse=refuse)
            return None
        worker = self.choose(token.weight, pin)
        if worker is None:
            self.enqueue_pending(token, pin, refuse=refuse)
            return None
        self.place(token, worker)
        return worker

    def take_pending(self, worker: Worker, batch: int) -> list[TaskToken[Any]]:
        """Move up to *batch* waiting tokens into *worker*'s mailbox. Caller holds the lock."""
        placed: list[TaskToken[Any]] = []
        if self.paused:
            return placed
        core = self.cores[worker.core_id]
        sources: list[Deque[TaskToken[Any]]] = []
        if core.pending and worker in core.workers[: core.active]:
            sources.append(core.pending)
        for weight in worker.classes:
            if self.pending_count[weight]:
                sources.append(self.pending[weight])
        paused_ops = self.paused_ops
        for queue in sources:
            while queue and len(placed) < batch:
                token = queue.popleft()
                if token._tstate is not _WAITING or token._where == NOWHERE:
                    continue  # killed or timed out while waiting: already uncounted
                self.pending_count[token.weight] -= 1
                self.pending_total -= 1
                if paused_ops and token.operation_type in paused_ops:
                    self._hold(token)  # paused after it was queued: it waits with the held calls
                    continue
                token._where = NOWHERE
                self.place(token, worker, from_pending=True)
                placed.append(token)
            if len(placed) >= batch:
                break
        self._drop_stale()
        return placed

    def _hold(self, token: TaskToken[Any]) -> None:
        """Add a WAITING *token* to its paused operation's held calls. Caller holds the lock."""
        held = self.held.get(token.operation_type)
        if held is None:
            held = self.held[token.operation_type] = collections.deque()
        held.append(token)
        token._where = IN_HELD

    def _drop_stale(self) -> None:
        """Clear pending deques that hold no queued token any more. Caller holds the lock.

        A WAITING token that is killed, times out or runs inline is uncounted at
        once but left in its deque, to be skipped when popped. A deque whose
        class (or, for pinned deques, the whole router) has nothing queued is
        never popped again, so those entries would keep settled tokens alive.
        """
        counts = self.pending_count
        for weight, queue in self.pending.items():
            if queue and not counts[weight]:
                queue.clear()
        if not self.pending_total:
            for core in self.cores.values():
                if core.pending:
                    core.pending.clear()

    def steal(self, worker: Worker, stuck_after: float) -> TaskToken[Any] | None:
        """Take one queued token from a sibling stuck on a long call. Caller holds the lock.

        Routing spreads tokens by load estimates; a call that turns out slow
        leaves the tokens behind it waiting while siblings idle. An idle
        worker takes the newest queued token (from the right, so the stuck
        worker's own next token is untouched) of a sibling on the same domain
        whose current call has run longer than *stuck_after* seconds.
        """
        core = self.cores[worker.core_id]
        if worker.index >= core.active:
            return None
        now = _perf()
        for sibling in core.workers:
            if sibling is worker or not sibling.mailbox:
                continue
            running = sibling.current
            started = running.started_at if running is not None else None
            if started is None or now - started < stuck_after:
                continue
            try:
                token = sibling.mailbox.pop()
            except IndexError:
                continue
            if token.weight not in worker.classes and token._where != IN_CORE_PENDING:
                sibling.mailbox.append(token)  # not ours to run (bulkhead): put it back
                continue
            self._move(token, sibling, worker)
            return token
        return None

    def queued_elsewhere(self, worker: Worker) -> bool:
        """Does a worker of another domain have tokens in its mailbox? A lock-free look (see steal_across)."""
        own = worker.core_id
        for core in self.cores.values():
            if core.core_id != own:
                for sibling in core.workers:
                    if sibling.mailbox:
                        return True
        return False

    def steal_across(self, worker: Worker) -> TaskToken[Any] | None:
        """Move one token from another domain's mailbox into *worker*'s; None if none may move. Caller holds the lock.

        The process lane's pull: a call is placed in a mailbox when it is
        submitted, and a worker process the host slows down would finish its
        share last while a sibling in another domain idles. Only what the
        placement could have done instead moves: a token of a class *worker*
        may run (its ``classes``, which already leave out the classes a
        bulkhead keeps off it), never one a policy routes (a sticky or ordered
        key, a conductor chain: ``pick_core`` / ``on_routed`` apply to it, so it
        stays on the domain they pinned). From the fullest mailbox, its newest
        token (from the right: the owner's next call is untouched).
        """
        home = self.cores[worker.core_id]
        if self.paused or worker.index >= home.active:
            return None
        classes = worker.classes
        victim: Worker | None = None
        most = 0
        for core in self.cores.values():
            if core is home:
                continue
            for sibling in core.workers:
                size = len(sibling.mailbox)
                if size <= most:
                    continue
                try:
                    last = sibling.mailbox[-1]
                except IndexError:
                    continue
                if last.weight in classes and last._tstate is _ADMITTED and _movable(last):
                    victim, most = sibling, size
        if victim is None:
            return None
        token = victim.mailbox.pop()  # all moves of a placed token happen under this lock
        self._move(token, victim, worker)
        return token

    def _move(self, token: TaskToken[Any], source: Worker, worker: Worker) -> None:
        """Put *token*, just popped from *source*'s mailbox, in *worker*'s, with its accounting. Lock held."""
        source.routed -= 1
        worker.routed += 1
        if source.core_id != worker.core_id:  # another domain: the token now counts as routed there
            self.cores[source.core_id].routed[token.weight] -= 1
            self.cores[worker.core_id].routed[token.weight] += 1
            token.core_id = worker.core_id
        worker.mailbox.append(token)

    def release_held(self, operation_type: str) -> list[TaskToken[Any]]:
        """Take the tokens held for a paused operation. Caller holds the lock."""
        held = self.held.pop(operation_type, None)
        if not held:
            return []
        out = []
        for token in held:
            if token._tstate is _WAITING:
                token._where = NOWHERE
                out.append(token)
        return out

    # -- inspection ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        cores = []
        for core in self.cores.values():
            workers = []
            depth = 0
            for w in core.workers:
                running = w.current
                queued = _queued(w)
                depth += queued
                workers.append(
                    {
                        "worker_id": w.worker_id,
                        "index": w.index,
                        "active": w.index < core.active,
                        "queue_depth": queued,
                        "busy": running is not None,
                        "running_operation": running.operation_type if running is not None else None,
                        "executed": w.executed,
                        "busy_time": round(w.busy_time, 6),
                        "classes": list(w.classes),
                        "alive": bool(w.thread is not None and w.thread.is_alive()),
                        **w.describe(),
                    }
                )
            cores.append(
                {
                    "core_id": core.core_id,
                    "owners": sorted(self.table.owners[core.core_id]),
                    "active_workers": core.active,
                    "queue_depth": depth,
                    # Live entries only: killed or timed-out ones stay until popped (see _drop_stale).
                    "pinned_pending": sum(1 for t in list(core.pending)
                                          if t._tstate is _WAITING and t._where == IN_CORE_PENDING),
                    "busy_workers": sum(1 for w in core.workers if w.current is not None),
                    "routed": dict(core.routed),
                    "routed_total": sum(core.routed.values()),
                    "workers": workers,
                }
            )
        return {
            "lane": self.lane,
            "cores": cores,
            "pending": dict(self.pending_count),
            "pending_total": self.pending_total,
            "peak_pending": self.peak_pending,
            "held": {op: len(q) for op, q in self.held.items() if q},
            "paused": self.paused,
            "paused_operations": sorted(self.paused_ops),
            "mailbox_size": self.mailbox_size,
            "max_pending": self.max_pending,
        }
