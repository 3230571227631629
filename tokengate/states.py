"""Token lifecycle states and the table of legal transitions.

A token is created, waits for admission, is admitted to a worker's mailbox,
executes on that worker's thread and settles in exactly one terminal state::

    CREATED ──► WAITING ──► ADMITTED ──► EXECUTING ──► COMPLETED | FAILED
       │           │            │            │
       │           │            │            ├──► TIMEOUT   (awaiter stops waiting; thread finishes)
       │           │            │            ├──► KILLED    (only at coordinator stop: abandoned)
       │           │            │            └──► WAITING   (a retry goes back through admission)
       │           │            └──► KILLED | TIMEOUT        (never runs)
       │           └──► KILLED | TIMEOUT | REJECTED | QUARANTINED | ADMITTED
       └──► ADMITTED | REJECTED | QUARANTINED | KILLED

Terminal states have no exits. ``REJECTED`` and ``QUARANTINED`` are reached from
``WAITING`` when a retry is refused on re-admission.
"""

from __future__ import annotations

import enum
from typing import Final, Mapping

__all__ = ["TokenState", "TERMINAL_STATES", "TRANSITIONS", "can_transition"]


class TokenState(str, enum.Enum):
    """Where a token is in its lifecycle. The value is the lowercase name."""

    CREATED = "created"
    WAITING = "waiting"
    ADMITTED = "admitted"
    EXECUTING = "executing"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"
    TIMEOUT = "timeout"
    REJECTED = "rejected"
    QUARANTINED = "quarantined"

    @property
    def is_terminal(self) -> bool:
        """True for the states a token never leaves."""
        return self in TERMINAL_STATES


_S = TokenState

TERMINAL_STATES: Final[frozenset[TokenState]] = frozenset(
    {_S.COMPLETED, _S.FAILED, _S.KILLED, _S.TIMEOUT, _S.REJECTED, _S.QUARANTINED}
)

TRANSITIONS: Final[Mapping[TokenState, frozenset[TokenState]]] = {
    _S.CREATED: frozenset({_S.WAITING, _S.ADMITTED, _S.REJECTED, _S.QUARANTINED, _S.KILLED}),
    _S.WAITING: frozenset({_S.ADMITTED, _S.KILLED, _S.TIMEOUT, _S.REJECTED, _S.QUARANTINED}),
    _S.ADMITTED: frozenset({_S.EXECUTING, _S.KILLED, _S.TIMEOUT}),
    _S.EXECUTING: frozenset({_S.COMPLETED, _S.FAILED, _S.TIMEOUT, _S.KILLED, _S.WAITING}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.KILLED: frozenset(),
    _S.TIMEOUT: frozenset(),
    _S.REJECTED: frozenset(),
    _S.QUARANTINED: frozenset(),
}


def can_transition(old: TokenState, new: TokenState) -> bool:
    """Return True when the table allows moving from *old* to *new*."""
    return new in TRANSITIONS[old]
