"""Safety and locality policies plugged into the token lifecycle (see :mod:`tokengate.policy`).

Each policy is self-contained and removable: pass the list you want as
``OperationsCoordinator(policies=[...])``. ``default_policies()`` is what a
coordinator installs when ``policies`` is not given.
"""

from __future__ import annotations

from ..policy import Policy
from .conductor import ConductorPolicy
from .quarantine import QuarantinePolicy
from .reputation import Health, ReputationPolicy
from .retries import RetryPolicy, compute_backoff
from .sticky import StickyPolicy
from .tiers import StorageSpeed, StorageTierPolicy

__all__ = [
    "ConductorPolicy",
    "Health",
    "QuarantinePolicy",
    "ReputationPolicy",
    "RetryPolicy",
    "StickyPolicy",
    "StorageSpeed",
    "StorageTierPolicy",
    "compute_backoff",
    "default_policies",
]


def default_policies() -> list[Policy]:
    """The policies a coordinator installs when ``policies=None``, in order.

    * ``ReputationPolicy()`` first (passive: it records, and refuses only
      operations an operator or ``auto_block=True`` blocked), so a blocked call
      takes no pin, slot or quarantine record;
    * ``StickyPolicy()`` and ``ConductorPolicy()`` (locality; they act only on
      functions with their tags, and on calls made inside a conductor lead);
    * ``StorageTierPolicy()`` last among the policies that may hold a call, so
      a scarce tier slot is taken only when the call is about to be routed;
    * ``RetryPolicy()`` last: ``after_run`` hooks run in reverse order, so it
      decides first whether an attempt is retried.

    Opt-in, because they change outcomes or touch disk/threads:
    ``QuarantinePolicy(path)`` (persists held calls in SQLite) and
    ``tokengate.convergence.ConvergencePolicy()`` (adaptive worker counts).
    """
    return [ReputationPolicy(), StickyPolicy(), ConductorPolicy(), StorageTierPolicy(), RetryPolicy()]
