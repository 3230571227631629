"""Typed access to the optional reputation and quarantine policies, for the admin routes.

The admin API talks to these policies only through the methods below (found
with ``coordinator.policy(name)``), so it works with any implementation that
has them. A policy that is not installed answers 404 ``policy_not_installed``;
one installed under the name but lacking a method answers 500
``policy_incompatible`` naming the method.

Policy calls are made on the event loop (admin routes are ``async def`` and
must not borrow the shared thread pool); they are operator-rate and expected
to be quick (in-memory state, or a small local SQLite store).
"""

from __future__ import annotations

import builtins
from typing import Any, Iterable, Mapping, Protocol, TypeVar, cast

from tokengate import OperationsCoordinator

from .errors import AdminError, ErrorCode

__all__ = ["ReputationAPI", "QuarantineAPI", "find_reputation", "find_quarantine", "reputation_policy",
           "quarantine_policy", "operation_rows", "operation_state"]

REPUTATION = "reputation"
QUARANTINE = "quarantine"


class ReputationAPI(Protocol):
    """What the admin API needs from the policy named ``"reputation"``."""

    def reputation(self, operation_type: str | None = None) -> list[dict[str, Any]]: ...
    def unblock(self, operation_type: str) -> Any: ...
    def block(self, operation_type: str) -> Any: ...
    def blocked(self) -> list[str]: ...


class QuarantineAPI(Protocol):
    """What the admin API needs from the policy named ``"quarantine"``."""

    def list(self, status: str | None = None, operation_type: str | None = None, limit: int = 50,
             offset: int = 0) -> builtins.list[dict[str, Any]]: ...
    def get(self, id: str) -> dict[str, Any] | None: ...
    def release(self, id: str, *, force: bool = False) -> Any: ...
    def discard(self, id: str) -> dict[str, Any]: ...
    def hold(self, operation_type: str) -> Any: ...
    def unhold(self, operation_type: str) -> Any: ...
    def held_operations(self) -> builtins.list[str]: ...


_REPUTATION_METHODS = ("reputation", "unblock", "block", "blocked")
_QUARANTINE_METHODS = ("list", "get", "release", "discard", "hold", "unhold", "held_operations")

P = TypeVar("P")


def _find(coordinator: OperationsCoordinator, name: str, methods: tuple[str, ...]) -> Any:
    policy = coordinator.policy(name)
    if policy is None:
        return None
    missing = [m for m in methods if not callable(getattr(policy, m, None))]
    if missing:
        raise AdminError(500, ErrorCode.POLICY_INCOMPATIBLE,
                         f"the installed {name!r} policy ({type(policy).__name__}) lacks "
                         f"{', '.join(m + '()' for m in missing)} needed by the admin API", policy=name)
    return policy


def _required(coordinator: OperationsCoordinator, name: str, found: P | None) -> P:
    if found is None:
        raise AdminError(404, ErrorCode.POLICY_NOT_INSTALLED,
                         f"the {name!r} policy is not installed on coordinator {coordinator.name!r}; "
                         "add it to OperationsCoordinator(policies=[...])", policy=name)
    return found


def find_reputation(coordinator: OperationsCoordinator) -> ReputationAPI | None:
    """The reputation policy, or None when it is not installed."""
    return cast("ReputationAPI | None", _find(coordinator, REPUTATION, _REPUTATION_METHODS))


def find_quarantine(coordinator: OperationsCoordinator) -> QuarantineAPI | None:
    """The quarantine policy, or None when it is not installed."""
    return cast("QuarantineAPI | None", _find(coordinator, QUARANTINE, _QUARANTINE_METHODS))


def reputation_policy(coordinator: OperationsCoordinator) -> ReputationAPI:
    """The reputation policy; raises a 404 ``policy_not_installed`` AdminError without it."""
    return _required(coordinator, REPUTATION, find_reputation(coordinator))


def quarantine_policy(coordinator: OperationsCoordinator) -> QuarantineAPI:
    """The quarantine policy; raises a 404 ``policy_not_installed`` AdminError without it."""
    return _required(coordinator, QUARANTINE, find_quarantine(coordinator))


def _flags(coordinator: OperationsCoordinator,
           paused_operations: Iterable[str] | None) -> tuple[set[str], set[str], set[str]]:
    reputation = find_reputation(coordinator)
    quarantine = find_quarantine(coordinator)
    if paused_operations is None:
        paused_operations = coordinator.stats()["paused_operations"]
    paused = set(paused_operations)
    held: set[str] = set(quarantine.held_operations()) if quarantine is not None else set()
    blocked: set[str] = set(reputation.blocked()) if reputation is not None else set()
    return paused, held, blocked


def operation_state(coordinator: OperationsCoordinator, operation_type: str) -> dict[str, Any]:
    """The paused/held/blocked flags of one operation."""
    paused, held, blocked = _flags(coordinator, None)
    return {"operation_type": operation_type, "paused": operation_type in paused,
            "held": operation_type in held, "blocked": operation_type in blocked}


def operation_rows(coordinator: OperationsCoordinator,
                   paused_operations: Iterable[str] | None = None,
                   lanes: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Reputation rows merged with admission flags and lanes, sorted by operation type.

    Without a reputation policy there are no rows, except for operations that
    are paused or held (so an operator can always see and undo those).
    *paused_operations* saves a stats() call when the caller has a snapshot;
    *lanes* (operation → lane, see ``_lanes.operation_lanes``) fills each
    row's ``lane`` (None when absent).
    """
    reputation = find_reputation(coordinator)
    paused, held, blocked = _flags(coordinator, paused_operations)
    rows: dict[str, dict[str, Any]] = {}
    if reputation is not None:
        for row in reputation.reputation():
            op = str(row.get("operation_type", ""))
            if op:
                rows[op] = dict(row)
    for op in paused | held | blocked:
        rows.setdefault(op, {"operation_type": op})
    for op, row in rows.items():
        row["paused"] = op in paused
        row["held"] = op in held
        row["blocked"] = op in blocked
        row["lane"] = row.get("lane") if lanes is None else lanes.get(op)
    return [rows[op] for op in sorted(rows)]
