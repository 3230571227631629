"""The quarantine's storage: held calls persisted for review, replay or discard.

* :mod:`.record` — a record and the store's errors (no I/O);
* :mod:`.store` — :class:`QuarantineStore`, the SQLite file (schema, migrations,
  retention, release claims shared between processes);
* :mod:`.writer` — the one thread that writes records, with a bounded queue and
  bounded waits, so the event loop never waits for SQLite.

The policy that decides which calls to hold is
:class:`tokengate.policies.QuarantinePolicy`.
"""

from __future__ import annotations

from .record import (
    QuarantineFullError,
    QuarantineRecord,
    QuarantineStateError,
    QuarantineStatus,
    QuarantineStoreError,
    summarize_args,
)
from .store import QuarantineStore, claim_is_live, process_identity

__all__ = [
    "QuarantineFullError",
    "QuarantineRecord",
    "QuarantineStateError",
    "QuarantineStatus",
    "QuarantineStore",
    "QuarantineStoreError",
    "claim_is_live",
    "process_identity",
    "summarize_args",
]
