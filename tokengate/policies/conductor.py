"""Hash conductor: a lead call and every call made inside it, at any depth, run on one worker domain.

Tags (validated at decoration):

* ``external_calls``: a non-empty list of the operation types the function
  calls (strings). It makes the function a *lead*: each call opens a *domain*
  whose *seed* is ``digest(f"{token_id}:{freeze(external_calls)!r}",
  digest_policy)``, unique per lead call because it contains the token id
  (computed when first read: only logs and statistics use it).
* ``sticky_key`` (declared by the sticky policy) on a lead: the seed is made
  from the lead's key instead of its token id, ``digest(f"{key!r}:
  {freeze(external_calls)!r}")`` with ``key = (anchor, fingerprint of the
  chosen values)`` (``hash_policy`` applies), so every lead of one account
  (say) has the same seed, and ``stats()`` lists each domain's key. The
  sticky policy, installed before this one by default, pins the leads of a
  key to one worker domain (and, with ``ordered``, runs them one at a time);
  their children follow each lead there. A key that cannot be computed
  refuses the lead with :class:`~tokengate.fingerprint.StickyKeyError`.
* ``digest_policy``: a :class:`~tokengate.fingerprint.DigestPolicy` or its
  value: ``"full"`` (SHA-256, 64 hex chars, default), ``"short"`` (16),
  ``"fast"`` (BLAKE2s, 16), ``"minimal"`` (8). The seed is a label for logs and
  statistics; domains are tracked by identity, so even a digest collision
  between two live leads cannot mix their accounting.

What a user sees:

* The lead goes where the router puts it, and its domain is pinned to the
  worker domain the lead runs on (recorded by its first call). Every
  decorated call made while a member of the domain runs (the lead, its
  children, their children...) joins the domain and is routed there, where
  the workers still run members in parallel. The list in
  ``external_calls`` documents the expected children; calls outside it join
  too and are counted in ``stats()["undeclared_members"]``.
* A member is counted when it is submitted (before it can possibly finish) and
  uncounted exactly once when it settles, whatever the outcome (completed,
  failed, killed, timed out, refused, stopped). When the count reaches zero
  the domain and its pin are released.
* **A lead called inside another domain** joins that domain as a member (its
  parent's domain stays open until it settles) *and* opens its own domain,
  pinned to the same worker domain. Its own calls join its own domain. Each
  domain is released by its own count, so neither leaks.
* A member that timed out keeps running on its thread; a call it makes after
  its domain closed re-opens the domain (same seed and core), counted as
  ``revived_total``. ``closed_total`` counts closings, so such a domain
  closes twice and the open ones are always ``opened_total + revived_total
  - closed_total``.
* Waiting on children does not deadlock: a lead that blocks in
  ``child.get()`` on a worker runs a child that has not started inline (the
  coordinator does this), so leads can outnumber the domain's workers.
* Calls made from threads the function starts itself are not on a worker
  thread and do not join (they are routed freely).

:func:`current_seed` returns the seed of the call running on this thread;
:meth:`ConductorPolicy.seed_of` the seed of a token.

Thread: ``before_submit`` on the submitting thread (a worker thread for
children), ``pick_core`` under the coordinator's routing lock,
``on_settle`` on the loop (or the submitting thread for a refused call). State
is guarded by ``self._lock``; no coordinator method is ever called with it held.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import current
from ..errors import ConfigurationError, describe_exception
from ..fingerprint import BoundKey, DigestPolicy, HashPolicy, StickyKeyError, digest, freeze
from ..policy import Policy
from ..tags import declare_tag
from .sticky import bind_sticky_key

if TYPE_CHECKING:
    from ..policy import PolicyHost
    from ..decorator import GuardedFunction
    from ..token import TaskToken

__all__ = ["ConductorPolicy", "current_seed"]

logger = logging.getLogger(__name__)

_OWNER = "tokengate.policies.conductor"
_SLOT = "conductor.member"  # token.policy_data key: this call's _Member (kept after settle: no user data)
_CACHE = "tokengate.conductor"  # guarded.policy_cache key: a lead function's _Lead
_SEED_PREFIX = 12
_KEY_CHARS = 80  # a keyed domain's key as listed in stats()


def _parse_calls(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigurationError(f"external_calls must be a list of operation types, got the string {value!r}; "
                                 f"write [{value!r}]")
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigurationError(f"external_calls must be a non-empty list of operation types, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ConfigurationError(f"external_calls entries must be non-empty strings, got {item!r} in {value!r}")
    return tuple(value)


declare_tag("external_calls", _OWNER, _parse_calls,
            "makes the function a lead: it and every call made inside it run on one worker domain")
declare_tag("digest_policy", _OWNER, DigestPolicy.parse,
            "how a lead's seed is hashed: full (default) | short | fast | minimal")


class _Lead(NamedTuple):
    """A lead function's settings, computed once and cached on the function."""

    calls: frozenset[str]
    frozen: str  # repr(freeze(external_calls)): the constant part of every seed
    digest_policy: DigestPolicy
    # sticky_key: the seed comes from the lead's key (anchor + chosen values), not its token id.
    anchor: str
    hash_policy: HashPolicy
    key: BoundKey | None
    error: str | None  # a sticky_key that does not fit the function: its calls are refused


def _lead(guarded: GuardedFunction[..., Any]) -> _Lead:
    cached: _Lead | None = guarded.policy_cache.get(_CACHE)
    if cached is None:
        tags = guarded.tags
        calls = tags["external_calls"]
        key = error = None
        chosen = tags.get("sticky_key")
        if chosen is not None:
            try:
                key = bind_sticky_key(guarded.func, chosen, tags)
            except Exception as exc:  # a ConfigurationError, or an odd callable's signature failing otherwise
                why = str(exc) if isinstance(exc, ConfigurationError) else describe_exception(exc)
                error = f"task_token_guard({guarded.operation_type!r}): tag 'sticky_key': {why}"
        cached = _Lead(frozenset(calls), repr(freeze(calls)), tags.get("digest_policy", DigestPolicy.FULL),
                       tags.get("sticky_anchor") or guarded.operation_type,
                       tags.get("hash_policy", HashPolicy.STANDARD), key, error)
        guarded.policy_cache[_CACHE] = cached
    return cached


def _safe_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a user object's __repr__ may fail; the key is then known by its type
        return f"<{type(value).__qualname__}>"


class _Domain:
    """One lead's call chain. ``core`` and ``pending`` are guarded by the policy's lock."""

    __slots__ = ("ident", "lead_id", "lead", "key", "core", "pending", "owner", "opened_at", "_seed")

    def __init__(self, ident: int, lead_id: str, lead: _Lead, core: int | None, owner: ConductorPolicy,
                 key: str | None = None) -> None:
        self.ident = ident
        self.lead_id = lead_id
        self.lead = lead
        # repr() of a keyed lead's (anchor, fingerprint): a string, so that no user object outlives the call.
        self.key = key
        self.core = core  # where the lead runs; None until its first call (or its parent's core)
        self.pending = 1  # the lead itself
        self.owner = owner
        self.opened_at = time.monotonic()
        self._seed: str | None = None

    @property
    def seed(self) -> str:
        """The digest, computed when first read: it is a label, so the hot path never hashes."""
        seed = self._seed
        if seed is None:  # two threads may both compute it: same value, no lock needed
            material = self.lead_id if self.key is None else self.key
            seed = self._seed = digest(f"{material}:{self.lead.frozen}", self.lead.digest_policy)
        return seed


class _Member:
    """How one call belongs to domains."""

    __slots__ = ("seed_domain", "joined", "own", "done")

    def __init__(self, seed_domain: _Domain, joined: _Domain | None, own: _Domain | None) -> None:
        self.seed_domain = seed_domain  # what calls made inside this one inherit (and where it runs)
        self.joined = joined  # the parent's domain this call counts in, if any
        self.own = own  # the domain this call opened as a lead, if any
        self.done = False


def _member(token: TaskToken[Any]) -> _Member | None:
    data = token.policy_data
    return None if data is None else data.get(_SLOT)


def current_seed() -> str | None:
    """The conductor seed of the call running on this worker thread, or None.

    Thread: any; outside a worker thread (or for a call in no domain) it is None.
    """
    token = current.running_token()
    member = None if token is None else _member(token)
    return None if member is None else member.seed_domain.seed


class ConductorPolicy(Policy):
    """Keeps a lead call and every call made inside it on the lead's worker domain.

    Install one instance per coordinator. This policy looks at every call (a
    child needs no tag), but a call that is neither a lead nor made inside a
    domain costs one thread-local read and a tag lookup at submission and a
    ``None`` check in ``pick_core`` and ``on_settle`` (about 0.2 us).

    Args:
        max_listed: How many domains ``stats()`` lists (the most pending first).
    """

    name = "conductor"
    route_marked_only = True  # only leads and members of a domain are routed by us
    follows_marked_parent = True  # children of a lead need no tag

    def __init__(self, *, max_listed: int = 100) -> None:
        if isinstance(max_listed, bool) or not isinstance(max_listed, int) or max_listed < 0:
            raise ConfigurationError(f"max_listed must be an integer >= 0, got {max_listed!r}")
        self.max_listed = max_listed
        # Guards _domains, every _Domain's core and pending, every _Member's done, and the counters.
        self._lock = threading.Lock()
        self._domains: dict[int, _Domain] = {}
        self._ids = itertools.count(1)
        self._coordinator: PolicyHost | None = None
        self._pending = 0
        self._opened = 0
        self._closed = 0
        self._members = 0
        self._undeclared = 0
        self._revived = 0

    def on_start(self, coordinator: PolicyHost) -> None:
        """Bind to *coordinator* (loop thread). One instance serves one coordinator."""
        if self._coordinator is not None and self._coordinator is not coordinator and self._coordinator.running:
            logger.error("ConductorPolicy instance is shared by coordinators %r and %r; give each its own",
                         self._coordinator.name, coordinator.name)
        self._coordinator = coordinator

    def on_stop(self, coordinator: PolicyHost) -> None:
        """Every token has settled by now, so every domain must be closed; log it if not (loop thread)."""
        with self._lock:
            left = len(self._domains)
        if left:
            logger.error("conductor: %d domains still open after stop (a bug; please report it)", left)

    def interested(self, guarded: GuardedFunction[..., Any]) -> bool:
        """Leads only; calls made inside a domain reach us through ``follows_marked_parent``."""
        return "external_calls" in guarded.tags

    @staticmethod
    def seed_of(token: TaskToken[Any]) -> str | None:
        """The seed of the domain *token* runs in (its own, for a lead), or None. Thread: any."""
        member = _member(token)
        return None if member is None else member.seed_domain.seed

    # -- hooks -----------------------------------------------------------------

    def before_submit(self, token: TaskToken[Any]) -> None:
        """Open a lead's domain, or join the running parent's domain (submitting thread).

        Runs before the call is routed, so a child is counted before it can finish.

        Raises:
            StickyKeyError: a lead's ``sticky_key`` does not fit it, or its key
                function raised for these arguments.
        """
        data = token.policy_data
        if data is not None and _SLOT in data:
            return  # a retry: already a member
        calls: tuple[str, ...] | None = token.tags.get("external_calls")
        parent: TaskToken[Any] | None = current.running_token()
        parent_domain = None
        parent_core = None
        if parent is not None:
            parent_member = _member(parent)
            if parent_member is not None and parent_member.seed_domain.owner is self:
                parent_domain = parent_member.seed_domain
                parent_core = parent.core_id
        if calls is None and parent_domain is None:
            return  # the common case: a plain call outside any domain
        guarded = token.guarded
        lead = None if calls is None or guarded is None else _lead(guarded)
        key = None
        if lead is not None and (lead.key is not None or lead.error is not None):
            key = self._key(token, lead)
        if data is None:
            data = token.policy_data = {}
        with self._lock:
            if parent_domain is not None:
                self._join(parent_domain, token, parent_core)
            if lead is not None:
                own = _Domain(next(self._ids), token.token_id, lead,
                              None if parent_domain is None else parent_domain.core, self, key)
                self._domains[own.ident] = own
                self._opened += 1
                self._pending += 1
                member = _Member(own, parent_domain, own)
            else:
                assert parent_domain is not None
                member = _Member(parent_domain, parent_domain, None)
        data[_SLOT] = member

    @staticmethod
    def _key(token: TaskToken[Any], lead: _Lead) -> str:
        """The repr of a keyed lead's sticky key; refuses the call when it cannot be computed."""
        if lead.key is None:
            raise StickyKeyError(lead.error or "sticky_key does not fit the function",
                                 operation_type=token.operation_type)
        try:
            key = lead.key.key(lead.anchor, token.args or (), token.kwargs or {}, lead.hash_policy)
        except Exception as exc:
            raise StickyKeyError(f"{token.operation_type}: the sticky_key function raised "
                                 f"{describe_exception(exc)}", operation_type=token.operation_type) from exc
        return _safe_repr(key)

    def _join(self, domain: _Domain, token: TaskToken[Any], parent_core: int | None) -> None:
        """Count *token* in *domain*. Caller holds the lock."""
        if domain.pending == 0:
            # The parent settled (timed out) but its thread still runs and makes calls.
            self._domains[domain.ident] = domain
            self._revived += 1
        domain.pending += 1
        self._pending += 1
        self._members += 1
        if token.operation_type not in domain.lead.calls:
            self._undeclared += 1
        if domain.core is None:
            # Pinned lazily, by the first call made inside it: the core the lead really
            # runs on (also right when a waiting worker ran the lead inline). This spares
            # every plain call an on_routed hook.
            domain.core = parent_core

    def pick_core(self, token: TaskToken[Any]) -> int | None:
        """The domain's worker domain, or None while a lead's is not known yet (routing lock held)."""
        data = token.policy_data
        if data is None:
            return None
        member: _Member | None = data.get(_SLOT)
        if member is None:
            return None
        core = member.seed_domain.core
        if core is not None:
            # Until the core re-runs pick_core when a per-operation pause ends, this is
            # what keeps such a held call in its domain (coordinator._reroute reads core_id).
            token.core_id = core
        return core

    def on_settle(self, token: TaskToken[Any]) -> None:
        """Uncount the call from its domains, exactly once; close a domain at zero."""
        data = token.policy_data
        if data is None:
            return
        member: _Member | None = data.get(_SLOT)
        if member is None:
            return
        with self._lock:
            if member.done:
                return
            member.done = True
            if member.own is not None:
                self._leave(member.own)
            if member.joined is not None:
                self._leave(member.joined)

    def _leave(self, domain: _Domain) -> None:
        """Uncount one member. Caller holds the lock."""
        domain.pending -= 1
        self._pending -= 1
        if domain.pending == 0:
            del self._domains[domain.ident]
            self._closed += 1
        elif domain.pending < 0:  # pragma: no cover - would mean a double count; keep the registry sane
            logger.error("conductor: domain %s went below zero pending", domain.seed[:_SEED_PREFIX])
            domain.pending = 0

    # -- inspection --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Open domains (the ``max_listed`` with most pending) and totals; JSON-ready. Thread: any."""
        now = time.monotonic()
        with self._lock:
            domains = list(self._domains.values())
            totals = {
                "domains": len(domains),
                "pending": self._pending,
                "opened_total": self._opened,
                "closed_total": self._closed,
                "members_total": self._members,
                "undeclared_members": self._undeclared,
                "revived_total": self._revived,
            }
        listed = [
            {"seed": d.seed[:_SEED_PREFIX], "lead": d.lead_id, "core": d.core, "pending": d.pending,
             "age": round(now - d.opened_at, 3),
             "key": d.key if d.key is None or len(d.key) <= _KEY_CHARS else d.key[: _KEY_CHARS - 3] + "..."}
            for d in heapq.nlargest(self.max_listed, domains, key=lambda d: d.pending)
        ]
        return {**totals, "listed": listed, "truncated": len(domains) > len(listed)}
