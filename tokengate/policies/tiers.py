"""Storage tiers: cap how many calls of one storage class execute at once.

A function tagged ``storage_speed`` (``slow`` | ``moderate`` | ``fast`` |
``insane``, case-insensitive, or a :class:`StorageSpeed`) takes a slot of its
tier before it may run. Every operation of a tier shares that tier's slots.
Defaults: SLOW 10, MODERATE 25, FAST 50, INSANE 70 concurrent executions.

A call that finds its tier full is *held by the policy* (state ``WAITING``)
in a FIFO per tier; it never occupies a worker thread while it waits. When an
attempt finishes, its slot passes straight to the oldest waiting call, which
is handed back to the coordinator for routing. These two are equivalent for a
caller, except that the second never blocks a worker thread::

    with tier_semaphore: read_disk()         # the old way: a worker sleeps on the semaphore
    await read_disk()                         # here: the call waits in the tier's FIFO

Slot life (each attempt takes its own slot, so a retry waits its turn again):

* taken in ``admit`` (first submission, a retry, or a release by another policy);
* released in ``after_run`` when the attempt finished, or in ``on_settle`` if
  the token settled still holding it (killed or stopped after admission, or
  timed out); a token killed or timed out while waiting in the FIFO leaves it.

Known limit: a token that times out *while executing* releases its slot at
the timeout, although its thread finishes the call later (threads cannot be
interrupted), so the tier may briefly run more than its limit. And a call
holding a slot that blocks on a child call of the same full tier waits for
ever (like any nested semaphore): the child is not run inline because it is
held here. A worker waiting on a call in the FIFO does run a slot holder that
has not started yet (``held_behind``), so a holder queued behind the waiting
worker cannot hang it.

Thread: ``admit`` runs on the submitting thread (or the loop), the other hooks
on the loop; ``stats()`` from any thread. One lock guards every tier.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Deque, Mapping

from ..errors import ConfigurationError
from ..policy import Policy
from ..states import TokenState
from ..tags import declare_tag

if TYPE_CHECKING:
    from ..policy import PolicyHost
    from ..decorator import GuardedFunction
    from ..token import TaskToken

__all__ = ["StorageSpeed", "StorageTierPolicy", "DEFAULT_TIER_LIMITS", "parse_storage_speed"]

logger = logging.getLogger(__name__)

TAG = "storage_speed"
# Keys in token.policy_data (shared with other policies, hence the prefix).
_SLOT = "tier.slot"  # the tier whose slot this token holds
_SINCE = "tier.waiting_since"  # present while the token waits in a tier FIFO (counted in `waiting`)
_EXECUTING = TokenState.EXECUTING
_MAX_LIMIT = 1_000_000


class StorageSpeed(str, enum.Enum):
    """A storage tier; the value is the lowercase name."""

    SLOW = "slow"  # HDD, network storage
    MODERATE = "moderate"  # SATA SSD
    FAST = "fast"  # NVMe
    INSANE = "insane"  # RAM disk, Optane


DEFAULT_TIER_LIMITS: Mapping[StorageSpeed, int] = {
    StorageSpeed.SLOW: 10,
    StorageSpeed.MODERATE: 25,
    StorageSpeed.FAST: 50,
    StorageSpeed.INSANE: 70,
}
_VALID = ", ".join(s.value for s in StorageSpeed)


def parse_storage_speed(value: Any) -> StorageSpeed:
    """Normalize a tier name (case-insensitive) or a :class:`StorageSpeed`; raise ConfigurationError."""
    if isinstance(value, StorageSpeed):
        return value
    if not isinstance(value, str):
        raise ConfigurationError(f"storage tier must be a string, one of {_VALID}; got {type(value).__name__} {value!r}")
    try:
        return StorageSpeed(value.strip().lower())
    except ValueError:
        raise ConfigurationError(f"unknown storage tier {value!r}; use one of {_VALID}") from None


declare_tag(TAG, "storage_tiers", parse_storage_speed,
            f"storage tier ({_VALID}): caps concurrent executions per tier (tokengate.policies.tiers)")


@dataclass
class _Tier:
    """One tier's slots and FIFO. Guarded by the policy's lock."""

    limit: int
    active: int = 0
    waiting: int = 0  # live tokens in `queue` (the deque may also hold stale, settled ones)
    queue: Deque[TaskToken[Any]] = field(default_factory=collections.deque)
    total: int = 0  # slots granted
    waited: int = 0  # grants that had to wait in the FIFO
    wait_sum: float = 0.0
    max_wait: float = 0.0
    peak_active: int = 0
    # The tokens holding a slot now, oldest grant first (for held_behind).
    holders: dict[TaskToken[Any], None] = field(default_factory=dict)

    def grant(self, token: TaskToken[Any], data: dict[str, Any], tier: StorageSpeed) -> None:
        self.active += 1
        self.total += 1
        if self.active > self.peak_active:
            self.peak_active = self.active
        self.holders[token] = None
        data[_SLOT] = tier


class StorageTierPolicy(Policy):
    """Limits concurrent executions per storage tier without holding worker threads.

    Args:
        limits: Per-tier overrides, e.g. ``{"slow": 4}``; tiers not given keep
            their defaults (SLOW 10, MODERATE 25, FAST 50, INSANE 70). Keys are
            tier names (case-insensitive) or :class:`StorageSpeed`; values are
            integers from 1 to 1,000,000.
        clock: Monotonic seconds, used for wait times (injectable for tests).

    Raises:
        ConfigurationError: for an unknown tier, a bad limit or a clock that is
            not callable, at construction.
    """

    name: ClassVar[str] = "storage_tiers"

    def __init__(
        self,
        limits: Mapping[str | StorageSpeed, int] | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        merged = dict(DEFAULT_TIER_LIMITS)
        if limits is not None:
            if not isinstance(limits, Mapping):
                raise ConfigurationError(
                    f"limits must be a dict of tier -> int, got {type(limits).__name__} {limits!r}")
            for key, value in limits.items():
                try:
                    tier = parse_storage_speed(key)
                except ConfigurationError as exc:
                    raise ConfigurationError(f"limits: {exc}") from None
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_LIMIT:
                    raise ConfigurationError(
                        f"limits[{tier.value!r}] must be an integer from 1 to {_MAX_LIMIT}, got {value!r}")
                merged[tier] = value
        if not callable(clock):  # else the first full tier fails in admit, which admits the call: no cap
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self._lock = threading.Lock()  # guards every _Tier and the _SLOT/_SINCE keys of held tokens
        self._tiers: dict[StorageSpeed, _Tier] = {t: _Tier(merged[t]) for t in StorageSpeed}
        self._coordinator: PolicyHost | None = None

    @property
    def limits(self) -> dict[str, int]:
        """The configured limit of each tier, by tier name."""
        return {t.value: tier.limit for t, tier in self._tiers.items()}

    def on_start(self, coordinator: PolicyHost) -> None:
        """Bind to *coordinator*; warn if a policy after this one may hold calls that took a slot."""
        self._coordinator = coordinator
        policies = list(coordinator.policies)
        later = policies[policies.index(self) + 1:] if self in policies else []
        holders = [p.name for p in later if type(p).admit is not Policy.admit]
        if holders:
            # Such a call would keep its scarce slot while it waits there (say, behind an
            # ordered key), and the tier's other calls would wait for nothing.
            logger.warning("storage_tiers is installed before %s, which may hold a call after it took its tier "
                           "slot; install storage_tiers after them (default_policies() does)", ", ".join(holders))

    def interested(self, guarded: GuardedFunction[..., Any]) -> bool:
        return TAG in guarded.tags

    # -- hooks ------------------------------------------------------------------

    def admit(self, token: TaskToken[Any]) -> bool:
        """Take a slot of the token's tier, or queue the token in the tier's FIFO (return False).

        Idempotent: a token that already holds a slot (handed back by us or
        by another policy) or already waits here is not counted twice.
        Thread: the submitting thread, or the loop (retries, releases).
        """
        data = token.policy_data
        if data is None:
            data = token.policy_data = {}
        speed: StorageSpeed = token.tags[TAG]
        with self._lock:
            if data.get(_SLOT) is not None:
                return True
            if _SINCE in data:
                return False
            tier = self._tiers[speed]
            # FIFO fairness: a newcomer never overtakes a waiting token.
            if tier.active < tier.limit and not tier.waiting:
                tier.grant(token, data, speed)
                return True
            data[_SINCE] = self._clock()
            tier.waiting += 1
            tier.queue.append(token)
            if len(tier.queue) > 2 * tier.waiting + 64:
                self._compact(tier)
            return False

    def after_run(self, token: TaskToken[Any]) -> float | None:
        """The attempt finished: free its slot and hand it to the oldest waiting token. Thread: loop."""
        with self._lock:
            handed = self._free_slot(token)
        self._hand_back(handed)
        return None

    def on_settle(self, token: TaskToken[Any]) -> None:
        """Free a slot still held, or leave the FIFO, when the token settled. Thread: loop (or submitter)."""
        # Under the lock even to look: another thread may be moving this token from the FIFO to a slot.
        with self._lock:
            data = token.policy_data
            if not data:
                return
            if data.pop(_SINCE, None) is not None:
                # Left in the deque as a stale entry: skipped when popped, dropped by _compact.
                self._tiers[token.tags[TAG]].waiting -= 1
            handed = self._free_slot(token)
        self._hand_back(handed)

    def held_behind(self, token: TaskToken[Any]) -> TaskToken[Any] | None:
        """For a call waiting in a tier's FIFO: the oldest slot holder that has not started, if any.

        A worker waiting on *token* runs that holder inline, which frees a slot;
        without it, a holder queued behind the waiting worker could never run.
        Thread: a waiting worker.
        """
        with self._lock:
            data = token.policy_data
            if not data or _SINCE not in data:
                return None
            for holder in self._tiers[token.tags[TAG]].holders:
                if holder.state is not _EXECUTING:
                    return holder
        return None

    # -- slots ------------------------------------------------------------------

    def _free_slot(self, token: TaskToken[Any]) -> TaskToken[Any] | None:
        """Free *token*'s slot, if it holds one; grant it to the oldest live waiter and return that one.

        Caller holds the lock and must pass the result to ``_hand_back`` after releasing it.
        """
        data = token.policy_data
        speed = None if data is None else data.pop(_SLOT, None)
        if speed is None:
            return None
        tier = self._tiers[speed]
        tier.active -= 1
        tier.holders.pop(token, None)
        queue = tier.queue
        while queue and tier.active < tier.limit:
            nxt = queue.popleft()
            nxt_data = nxt.policy_data
            since = None if nxt_data is None else nxt_data.pop(_SINCE, None)
            if nxt_data is None or since is None:
                continue  # stale: settled while waiting, already uncounted
            tier.waiting -= 1
            if nxt.settled:
                continue  # killed or timed out: its on_settle finds nothing left to undo
            wait = self._clock() - since
            tier.waited += 1
            tier.wait_sum += wait
            if wait > tier.max_wait:
                tier.max_wait = wait
            tier.grant(nxt, nxt_data, speed)
            return nxt
        return None

    def _hand_back(self, token: TaskToken[Any] | None) -> None:
        # Outside our lock: release_held runs the admit hooks (ours says yes at once) and routing.
        if token is not None:
            (self._coordinator or token.coordinator).release_held(token)

    @staticmethod
    def _compact(tier: _Tier) -> None:
        """Drop stale entries so the FIFO stays O(live waiters). Caller holds the lock."""
        tier.queue = collections.deque(
            t for t in tier.queue if t.policy_data is not None and _SINCE in t.policy_data)

    # -- statistics -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per tier: limit, active, waiting, peak_active, total grants, waited, mean/max wait (seconds).

        ``mean_wait`` is over every grant (0 for a call that found a free slot);
        a wait is the time the token sat in this policy's FIFO.
        """
        with self._lock:
            tiers = {
                speed.value: {
                    "limit": t.limit,
                    "active": t.active,
                    "waiting": t.waiting,
                    "peak_active": t.peak_active,
                    "total": t.total,
                    "waited": t.waited,
                    "mean_wait": (t.wait_sum / t.total) if t.total else 0.0,
                    "max_wait": t.max_wait,
                }
                for speed, t in self._tiers.items()
            }
        return {"tiers": tiers}
