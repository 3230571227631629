"""The hook plan: which policy hooks apply to calls of one decorated function.

Computed once per (coordinator, function) so that the hot path only checks a
few precomputed tuples and flags, and a hook no policy overrides costs nothing.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from .policy import HOOKS, Policy
from .states import TERMINAL_STATES, TokenState

if TYPE_CHECKING:
    from .decorator import GuardedFunction
    from .routing import Router

__all__ = ["_Plan"]

logger = logging.getLogger("tokengate.coordinator")


class _Plan:
    """The hooks that apply to one decorated function, computed once per coordinator."""

    __slots__ = HOOKS + ("pick_core_marked", "on_routed_marked", "slow", "marked_routes", "on_settle_for", "router")
    before_submit: tuple[Policy, ...]
    admit: tuple[Policy, ...]
    pick_core: tuple[Policy, ...]
    on_routed: tuple[Policy, ...]
    after_run: tuple[Policy, ...]
    on_settle: tuple[Policy, ...]
    held_behind: tuple[Policy, ...]
    # Routing hooks of policies that asked for them only on tokens they marked.
    pick_core_marked: tuple[Policy, ...]
    on_routed_marked: tuple[Policy, ...]
    slow: bool
    marked_routes: bool
    # on_settle hooks per terminal state (policies may narrow with settle_states).
    on_settle_for: dict[TokenState, tuple[Policy, ...]]
    # The router of the lane the function runs on.
    router: Router

    def __init__(self, policies: Sequence[Policy], guarded: GuardedFunction[..., Any], router: Router,
                 nested: bool = False) -> None:
        self.router = router
        interested = [p for p in policies if _interested(p, guarded) or (nested and p.follows_marked_parent)]
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


def _interested(policy: Policy, guarded: GuardedFunction[..., Any]) -> bool:
    """``policy.interested(guarded)``; a policy whose check raises is treated as interested.

    A bug in a policy must not fail calls; and a safety policy that cannot say
    whether it cares is safer applied (its hooks' own failures are contained).
    """
    try:
        return bool(policy.interested(guarded))
    except Exception:
        logger.exception("policy %s failed in interested(%s); its hooks apply to this function",
                         policy.name, guarded.key)
        return True
