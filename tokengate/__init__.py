"""tokengate: run blocking sync functions from async code on weight-class worker domains.

Decorate a sync function with :func:`task_token_guard`; each call returns a
:class:`TaskToken` at once and runs on a worker thread of the current
:class:`OperationsCoordinator`. ``await token`` (or ``token.get()``) waits.
"""

from __future__ import annotations

from .complexity import ComplexityClass, ComplexityReport
from .coordinator import DrainReport, KillResult, OperationsCoordinator
from .current import current_coordinator
from .decorator import GuardedFunction, resolve_guarded, task_token_guard
from .errors import (
    ConfigurationError,
    CoordinatorNotRunning,
    CoordinatorStopped,
    GateClosed,
    InvalidTransition,
    OperationBlocked,
    Overloaded,
    Rejected,
    TokengateError,
    TokenKilled,
    TokenQuarantined,
    TokenTimeout,
    WouldDeadlock,
)
from .metrics import ExecutionRecord
from .policy import Policy
from .states import TERMINAL_STATES, TRANSITIONS, TokenState
from .tags import TagSpec, declare_tag, declared_tags
from .token import TaskToken
from .topology import RoutingTable, Topology, detect_topology, routing_table

# Imported last: each policy module declares its tags at import, so every tag
# is known before any function is decorated.
from .convergence import ConvergencePolicy
from .fingerprint import DigestPolicy, HashPolicy
from .policies import (
    ConductorPolicy,
    QuarantinePolicy,
    ReputationPolicy,
    RetryPolicy,
    StickyPolicy,
    StorageSpeed,
    StorageTierPolicy,
    default_policies,
)

__version__ = "0.1.0"

__all__ = [
    "ConductorPolicy",
    "ConvergencePolicy",
    "DigestPolicy",
    "HashPolicy",
    "QuarantinePolicy",
    "ReputationPolicy",
    "RetryPolicy",
    "StickyPolicy",
    "StorageSpeed",
    "StorageTierPolicy",
    "default_policies",
    "ComplexityClass",
    "ComplexityReport",
    "ConfigurationError",
    "CoordinatorNotRunning",
    "CoordinatorStopped",
    "DrainReport",
    "ExecutionRecord",
    "GateClosed",
    "GuardedFunction",
    "InvalidTransition",
    "KillResult",
    "OperationBlocked",
    "OperationsCoordinator",
    "Overloaded",
    "Policy",
    "Rejected",
    "RoutingTable",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "TagSpec",
    "TaskToken",
    "TokenKilled",
    "TokenQuarantined",
    "TokenState",
    "TokenTimeout",
    "TokengateError",
    "Topology",
    "WouldDeadlock",
    "current_coordinator",
    "declare_tag",
    "declared_tags",
    "detect_topology",
    "resolve_guarded",
    "routing_table",
    "task_token_guard",
]
