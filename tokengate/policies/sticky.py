"""Sticky routing: calls with the same key run on one worker domain; ordered keys run one at a time.

Tags (validated at decoration):

* ``sticky_key``: which arguments form the key, chosen by parameter name
  (``"account_id"``, or a tuple of names) or computed by a function of the
  arguments (``lambda account_id, **_: account_id.lower()``, called with every
  argument by parameter name). Names are bound with the function's signature,
  so ``f("a", 1)`` and ``f(amount=1, account_id="a")`` have the same key. The
  call's *sticky key* is ``(anchor, fingerprint of the chosen values)``; the
  other arguments do not matter. A name that is not a parameter is a
  ``ConfigurationError`` listing the parameters, at decoration (the tag's
  ``check`` against the function, run by the decorator). A
  key function that raises refuses that call with ``StickyKeyError`` (its
  exception is the ``__cause__``); it runs on the submitting thread, once per
  policy that keys the call: keep it cheap and pure.
* ``sticky_anchor``: a non-empty string, the namespace of the keys (default:
  the ``operation_type``). Functions that share an anchor share keys when their
  chosen values are equal. Without ``sticky_key``, the key is
  ``fingerprint.routing_key(anchor, args, kwargs, hash_policy)``: the anchor
  plus a fingerprint of all the arguments (see :mod:`tokengate.fingerprint` for
  what the fingerprint of each kind of value is).
* ``hash_policy``: a :class:`~tokengate.fingerprint.HashPolicy` or its value
  (``"none"`` = the key is the anchor alone, ``"fast"``, ``"standard"``
  (default), ``"full"``); it applies to the chosen values with ``sticky_key``
  (``"none"`` with ``sticky_key`` is a contradiction, refused like a bad name).
* ``ordered``: ``True`` makes calls with the same key run one at a time, in
  submission order; different keys still run in parallel. A function with
  ``ordered`` but no ``sticky_anchor`` uses its ``operation_type`` as the
  anchor (without ``sticky_key`` the key is then "this function with these
  arguments"; add ``hash_policy: "none"`` to serialise every call of the
  function).

What a user sees:

* **Pins.** The first call of a key lands wherever the router puts it; while
  any call of the key is in flight, every later one goes to the same domain,
  whose workers still run them in parallel (a pin is locality, not a lock; use
  ``ordered`` for exclusion). Pins are counted from submission to settlement
  and released when the key's last call reaches any terminal state, so the
  registry holds only live keys. While the key's first call still waits for a
  mailbox, later calls wait in the policy until it is placed, so a key never
  gets two pins.
* **Ordered keys.** Held calls wait in a per-key FIFO in the policy and go to
  the coordinator one at a time. A call that is killed, fails, times out or is
  refused leaves the queue and the next one starts; a retry keeps its place.
  A timed-out call frees its key at the timeout, while its thread may still be
  finishing.
* **Held calls are not run inline.** A worker that waits (``get()``) on a call
  that has not started runs it inline, but not a call this policy holds: it
  waits for its release, running the call it is held behind if that one has
  not started yet (``held_behind``), so waiting on a key's later call before
  its earlier one cannot hang. A call must never wait on a later call of its
  own ordered key (that is logged as a warning: it can only start after the
  waiting call ends).
* **Exceptions to the pin**, by design: a call run inline by a waiting worker
  runs on that worker's domain (deadlock freedom beats locality; if it is the
  key's first call, that domain becomes the pin), and a pin from a policy
  earlier in the list wins.

Thread: ``before_submit`` and ``admit`` on the submitting thread (or the loop
for releases and retries), ``pick_core``/``on_routed`` under the coordinator's
routing lock, ``on_settle`` on the loop (or the submitting thread for a call
refused at submission). All state is guarded by ``self._lock``; coordinator
methods are only called after releasing it.
"""

from __future__ import annotations

import collections
import heapq
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Deque, Hashable, Mapping, NamedTuple

from .. import current
from ..errors import ConfigurationError, describe_exception
from ..fingerprint import ArgumentKey, BoundKey, HashPolicy, StickyKeyError, routing_key
from ..policy import Policy
from ..states import TokenState
from ..tags import declare_tag

if TYPE_CHECKING:
    import asyncio

    from ..policy import PolicyHost
    from ..decorator import GuardedFunction
    from ..token import TaskToken

__all__ = ["StickyPolicy"]

logger = logging.getLogger(__name__)

_OWNER = "tokengate.policies.sticky"
_SLOT = "sticky.ticket"  # token.policy_data key: this call's _Ticket (removed at settle)
_CACHE = "tokengate.sticky"  # guarded.policy_cache key: the function's _Config, or None
_NOT_HELD, _HELD_ORDER, _HELD_CORE = 0, 1, 2
_CREATED = TokenState.CREATED
_EXECUTING = TokenState.EXECUTING
_SUMMARY_CHARS = 80


def _parse_anchor(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"sticky_anchor must be a non-empty string, got {value!r}")
    return value


def _parse_ordered(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"ordered must be True or False, got {type(value).__name__} {value!r}")
    return value


def bind_sticky_key(func: Callable[..., Any], value: ArgumentKey, tags: Mapping[str, Any]) -> BoundKey:
    """Check a parsed ``sticky_key`` against *func* and the other tags; return its :class:`BoundKey`.

    Raises:
        ConfigurationError: a name that is not a parameter of *func* (the
            message lists them), a key function that cannot take *func*'s
            arguments by name, or ``hash_policy: "none"`` (which would ignore
            the chosen values).
    """
    if tags.get("hash_policy") is HashPolicy.NONE:
        raise ConfigurationError("hash_policy 'none' ignores the arguments, but sticky_key chooses some; "
                                 "drop one of the two")
    return value.bind(func)


def _check_sticky_key(func: Callable[..., Any], value: Any, tags: Mapping[str, Any]) -> None:
    bind_sticky_key(func, value, tags)


# The decorator runs the check against the function at decoration.
declare_tag("sticky_key", _OWNER, ArgumentKey.parse,
            "which arguments form the sticky key: a parameter name, a tuple of names, or a function of the arguments",
            check=_check_sticky_key)
declare_tag("sticky_anchor", _OWNER, _parse_anchor,
            "route calls with the same anchor + key (default: all arguments) to one worker domain")
declare_tag("ordered", _OWNER, _parse_ordered,
            "True: calls with the same sticky key run one at a time, in submission order")
declare_tag("hash_policy", _OWNER, HashPolicy.parse,
            "how arguments enter the sticky key: none | fast | standard (default) | full")


class _Config(NamedTuple):
    """A function's sticky settings, parsed once and cached on the function."""

    anchor: str
    hash_policy: HashPolicy
    ordered: bool
    key: BoundKey | None  # sticky_key, bound to the function; None: all the arguments
    error: str | None  # a sticky_key that does not fit the function: every call is refused with this


def _config(guarded: GuardedFunction[..., Any]) -> _Config | None:
    cache = guarded.policy_cache
    if _CACHE in cache:
        cached: _Config | None = cache[_CACHE]
        return cached
    tags = guarded.tags
    ordered = bool(tags.get("ordered", False))
    anchor: str | None = tags.get("sticky_anchor")
    chosen: ArgumentKey | None = tags.get("sticky_key")
    if anchor is None and (ordered or chosen is not None):
        anchor = guarded.operation_type  # documented: ordered or sticky_key alone key by the function
    config = None
    if anchor is not None:
        key = error = None
        if chosen is not None:
            try:
                key = bind_sticky_key(guarded.func, chosen, tags)
            except Exception as exc:  # a ConfigurationError, or an odd callable's signature failing otherwise
                why = str(exc) if isinstance(exc, ConfigurationError) else describe_exception(exc)
                error = f"task_token_guard({guarded.operation_type!r}): tag 'sticky_key': {why}"
                logger.error("%s; every call of %s is refused", error, guarded.key)
        config = _Config(anchor, tags.get("hash_policy", HashPolicy.STANDARD), ordered, key, error)
    elif "hash_policy" in tags:
        logger.warning("%s: hash_policy has no effect without sticky_anchor or ordered", guarded.key)
    cache[_CACHE] = config
    return config


class _Pin:
    """One live sticky key. Every field is guarded by the policy's lock."""

    __slots__ = ("key", "core", "inflight", "placer", "waiting", "held", "queue", "queued", "active")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.core: int | None = None  # set once, by the first call of the key that is placed
        self.inflight = 0  # calls of this key submitted and not yet settled
        self.placer: _Ticket | None = None  # the one call allowed to route while core is None
        self.waiting: Deque[_Ticket] = collections.deque()  # held until core is known
        self.held = 0  # live (not settled) tickets in waiting
        self.queue: Deque[_Ticket] = collections.deque()  # ordered calls not yet started, FIFO
        self.queued = 0  # live (not settled) tickets in queue
        self.active: _Ticket | None = None  # the ordered call currently allowed to run


class _Ticket:
    """One call's membership of a pin."""

    __slots__ = ("token", "pin", "ordered", "queued", "held", "done")

    def __init__(self, token: TaskToken[Any], pin: _Pin, ordered: bool) -> None:
        self.token: TaskToken[Any] | None = token  # dropped at settle
        self.pin = pin
        self.ordered = ordered
        self.queued = ordered  # in pin.queue, not yet the active call of its key
        self.held = _NOT_HELD  # which gate of admit() holds it
        self.done = False


def _ticket(token: TaskToken[Any]) -> _Ticket | None:
    data = token.policy_data
    return None if data is None else data.get(_SLOT)


def _summary(key: Hashable) -> str:
    try:
        text = repr(key)
    except Exception:  # a user object's __repr__ may fail; the summary is only informative
        text = f"<{type(key).__qualname__}>"
    return text if len(text) <= _SUMMARY_CHARS else text[: _SUMMARY_CHARS - 3] + "..."


class StickyPolicy(Policy):
    """Pins calls with the same sticky key to one worker domain; serialises ``ordered`` keys.

    Install one instance per coordinator, for example
    ``OperationsCoordinator(policies=[StickyPolicy(), ConductorPolicy()])``.
    See the module docstring for the tags and what they do.

    Args:
        max_listed: How many pins ``stats()`` lists (the busiest first).
    """

    name = "sticky"

    def __init__(self, *, max_listed: int = 100) -> None:
        if isinstance(max_listed, bool) or not isinstance(max_listed, int) or max_listed < 0:
            raise ConfigurationError(f"max_listed must be an integer >= 0, got {max_listed!r}")
        self.max_listed = max_listed
        # Guards _pins, every _Pin and _Ticket, and the counters below.
        self._lock = threading.Lock()
        self._pins: dict[Hashable, _Pin] = {}
        self._coordinator: PolicyHost | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0
        self._held_core = 0
        self._held_order = 0
        self._opened = 0
        self._released = 0
        self._pinned_routes = 0
        self._off_pin = 0

    # -- lifecycle -------------------------------------------------------------

    def on_start(self, coordinator: PolicyHost) -> None:
        """Bind to *coordinator* (loop thread). One instance serves one coordinator."""
        if self._coordinator is not None and self._coordinator is not coordinator and self._coordinator.running:
            logger.error("StickyPolicy instance is shared by coordinators %r and %r; give each its own",
                         self._coordinator.name, coordinator.name)
        self._coordinator = coordinator
        self._loop = coordinator.loop

    def on_stop(self, coordinator: PolicyHost) -> None:
        """Every token has settled by now, so every pin must be gone; log it if not (loop thread)."""
        with self._lock:
            left = len(self._pins)
        if left:
            logger.error("sticky: %d pins still registered after stop (a bug; please report it)", left)

    def interested(self, guarded: GuardedFunction[..., Any]) -> bool:
        """Only functions with ``sticky_key``, ``sticky_anchor`` or ``ordered`` pay for this policy."""
        return _config(guarded) is not None

    # -- hooks -----------------------------------------------------------------

    def before_submit(self, token: TaskToken[Any]) -> None:
        """Compute the key once and count the call in flight from now on (submitting thread).

        Raises:
            StickyKeyError: the function's ``sticky_key`` does not fit it, or
                its key function raised for these arguments.
        """
        data = token.policy_data
        if data is not None and _SLOT in data:
            return  # a retry: already counted under the same key
        guarded = token.guarded
        config = None if guarded is None else _config(guarded)
        if config is None:
            return
        chosen = config.key
        if chosen is not None:
            try:
                key: Hashable = chosen.key(config.anchor, token.args or (), token.kwargs or {}, config.hash_policy)
            except Exception as exc:
                raise StickyKeyError(f"{token.operation_type}: the sticky_key function raised "
                                     f"{describe_exception(exc)}", operation_type=token.operation_type) from exc
        elif config.error is not None:
            raise StickyKeyError(config.error, operation_type=token.operation_type)
        else:
            key = routing_key(config.anchor, token.args or (), token.kwargs or {}, config.hash_policy)
        if data is None:
            data = token.policy_data = {}
        with self._lock:
            pin = self._pins.get(key)
            if pin is None:
                pin = self._pins[key] = _Pin(key)
                self._opened += 1
            pin.inflight += 1
            self._inflight += 1
            ticket = _Ticket(token, pin, config.ordered)
            if config.ordered:
                pin.queue.append(ticket)
                pin.queued += 1
        data[_SLOT] = ticket

    def admit(self, token: TaskToken[Any]) -> bool:
        """Pass the call, or hold it: behind its ordered key, or until its key's pin is known.

        Idempotent: called again for a call it holds, it keeps holding it; called
        after the policy released it, it passes.
        """
        ticket = _ticket(token)
        if ticket is None:
            return True
        reentrant = passed = False
        adopted: list[TaskToken[Any]] = []
        with self._lock:
            if ticket.done:
                return True
            pin = ticket.pin
            if ticket.ordered and pin.active is not ticket:
                if pin.active is not None or self._head(pin) is not ticket:
                    if ticket.held == _HELD_ORDER:
                        return False
                    ticket.held = _HELD_ORDER
                    self._held_order += 1
                    reentrant = self._is_running_active(pin)
                else:
                    self._activate(pin, ticket)
            if ticket.held != _HELD_ORDER:
                if pin.placer is not ticket:
                    # Holding here would deadlock a placer run inline that waits on us.
                    adopted = [t for t in self._adopt_running_placer(pin) if t is not token]
                if pin.core is None and pin.placer is not None and pin.placer is not ticket:
                    if ticket.held != _HELD_CORE:
                        ticket.held = _HELD_CORE
                        self._held_core += 1
                        pin.held += 1
                        pin.waiting.append(ticket)
                    return False
                if pin.core is None:
                    pin.placer = ticket
                passed = True
        if adopted:
            self._release_now(adopted)
        if passed:
            return True
        if reentrant:
            logger.warning("ordered key %s: %r was submitted by the running call of the same key; it starts only "
                           "after that call finishes, so waiting on it there would deadlock", _summary(pin.key), token)
        return False

    def pick_core(self, token: TaskToken[Any]) -> int | None:
        """The key's pinned domain, or None for the call that decides it (routing lock held)."""
        ticket = _ticket(token)
        if ticket is None:
            return None
        with self._lock:
            core = ticket.pin.core
            if core is not None:
                self._pinned_routes += 1
        if core is not None:
            # Until the core re-runs pick_core when a per-operation pause ends, this is
            # what keeps such a held call on its pin (coordinator._reroute reads core_id).
            token.core_id = core
        return core

    def on_routed(self, token: TaskToken[Any], core: int) -> None:
        """Record the pin when the key's first call is placed; release calls waiting for it."""
        ticket = _ticket(token)
        if ticket is None:
            return
        with self._lock:
            if ticket.done:
                return
            pin = ticket.pin
            if pin.core is None:
                pin.core = core
                pin.placer = None
                release = self._unblock(pin)
            else:
                if pin.core != core:
                    self._off_pin += 1  # an earlier policy pinned this call elsewhere
                return
        if release:
            self._release_later(release)

    def on_settle(self, token: TaskToken[Any]) -> None:
        """Leave the key (exactly once per call); release the pin when its last call settles."""
        data = token.policy_data
        ticket = None if data is None else data.pop(_SLOT, None)  # the key may hold user objects
        if ticket is None:
            return
        with self._lock:
            if ticket.done:
                return
            ticket.done = True
            ticket.token = None
            pin = ticket.pin
            if ticket.held == _HELD_ORDER:
                self._held_order -= 1
            elif ticket.held == _HELD_CORE:
                self._held_core -= 1
                pin.held -= 1  # its entry is skipped lazily when the pin is known
                if len(pin.waiting) > 2 * pin.held + 64:
                    # An unplaced first call (say, in a full storage tier) must not collect cancelled callers.
                    pin.waiting = collections.deque(t for t in pin.waiting if not t.done)
            if pin.active is ticket:
                pin.active = None
            elif ticket.queued:
                pin.queued -= 1  # skipped lazily when it reaches the head of the queue
                if len(pin.queue) > 2 * pin.queued + 64:
                    # Behind a long-running call, cancelled callers would otherwise pile up here.
                    pin.queue = collections.deque(t for t in pin.queue if not t.done)
            if pin.placer is ticket:
                pin.placer = None
            pin.inflight -= 1
            self._inflight -= 1
            release = self._unblock(pin)
            if pin.inflight == 0:
                del self._pins[pin.key]
                self._released += 1
        self._release_now(release)

    def held_behind(self, token: TaskToken[Any]) -> TaskToken[Any] | None:
        """The call *token* waits for: its ordered key's running (or next) call, or the call deciding its pin."""
        ticket = _ticket(token)
        if ticket is None:
            return None
        adopted: list[TaskToken[Any]] = []
        with self._lock:
            if ticket.done:
                return None
            pin = ticket.pin
            if ticket.held == _HELD_ORDER:
                behind = pin.active if pin.active is not None else self._head(pin)
            elif ticket.held == _HELD_CORE:
                behind = pin.placer
                # The placer may be the very call waiting here, run inline.
                adopted = self._adopt_running_placer(pin)
                if adopted:
                    behind = None
            else:
                return None
        if adopted:
            self._release_now(adopted)
        return None if behind is None or behind is ticket else behind.token

    # -- helpers (caller holds the lock unless said otherwise) ------------------

    @staticmethod
    def _head(pin: _Pin) -> _Ticket | None:
        queue = pin.queue
        while queue and queue[0].done:
            queue.popleft()
        return queue[0] if queue else None

    @staticmethod
    def _activate(pin: _Pin, ticket: _Ticket) -> None:
        """Make the head of the ordered queue the key's running call."""
        pin.queue.popleft()
        pin.queued -= 1
        ticket.queued = False
        pin.active = ticket

    def _adopt_running_placer(self, pin: _Pin) -> list[TaskToken[Any]]:
        """Pin *pin* where its placer runs, if it started without being routed; return the calls to release.

        A placer run inline from a pending queue gets no on_routed: it pins where
        it runs, and the calls held for the pin may go (the caller releases them
        after unlocking).
        """
        placer = pin.placer
        if pin.core is not None or placer is None:
            return []
        token = placer.token
        if token is None or token.state is not _EXECUTING or token.core_id is None:
            return []
        pin.core = token.core_id
        pin.placer = None
        return self._unblock(pin)

    @staticmethod
    def _is_running_active(pin: _Pin) -> bool:
        parent = current.running_token()
        active = pin.active
        return parent is not None and active is not None and active.token is parent

    def _unblock(self, pin: _Pin) -> list[TaskToken[Any]]:
        """Pick the held calls that may go now; the caller releases them after unlocking."""
        out: list[TaskToken[Any]] = []
        if pin.active is None:
            head = self._head(pin)
            if head is not None and head.held == _HELD_ORDER:
                self._activate(pin, head)
                head.held = _NOT_HELD
                self._held_order -= 1
                if head.token is not None:
                    out.append(head.token)
        waiting = pin.waiting
        while waiting and (pin.core is not None or pin.placer is None):
            ticket = waiting.popleft()
            if ticket.done or ticket.held != _HELD_CORE:
                continue
            ticket.held = _NOT_HELD
            self._held_core -= 1
            pin.held -= 1
            if pin.core is None:
                pin.placer = ticket  # the next call to decide the pin
            if ticket.token is not None:
                out.append(ticket.token)
        return out

    def _release_now(self, tokens: list[TaskToken[Any]]) -> None:
        """Hand held calls back to the coordinator. Never called with the lock held."""
        coordinator = self._coordinator
        if coordinator is None:
            return
        early: list[TaskToken[Any]] = []
        for token in tokens:
            if token.state is _CREATED:
                # admit() returned False on another thread, which has not recorded the hold
                # yet: release_held() would ignore the token now. Try again from the loop.
                early.append(token)
            else:
                coordinator.release_held(token)
        if early:
            self._release_later(early)

    def _release_later(self, tokens: list[TaskToken[Any]]) -> None:
        # on_routed runs under the routing lock, which release_held needs: hop to the loop.
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._release_now, tokens)
        except RuntimeError:  # loop closed: the coordinator stopped and settled these calls
            pass

    # -- inspection --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Live pins (the busiest ``max_listed``) and totals; JSON-ready. Thread: any."""
        with self._lock:
            pins = list(self._pins.values())
            totals = {
                "pins": len(pins),
                "inflight": self._inflight,
                "waiting_for_pin": self._held_core,
                "waiting_in_order": self._held_order,
                "opened_total": self._opened,
                "released_total": self._released,
                "pinned_routes": self._pinned_routes,
                "off_pin_routes": self._off_pin,
            }
        # Read outside the lock: the fields are plain ints, and repr() may run user code.
        busiest = heapq.nlargest(self.max_listed, pins, key=lambda p: p.inflight)
        listed = [
            {"key": _summary(p.key), "core": p.core, "inflight": p.inflight, "ordered_queue": p.queued}
            for p in busiest
        ]
        return {**totals, "listed": listed, "truncated": len(pins) > len(listed)}
