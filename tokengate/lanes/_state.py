"""Where a worker-process handle is (:class:`ProcessState`) and a snapshot of it (:class:`ProcessStats`).

Both are public (re-exported by :mod:`tokengate.lanes`). Kept and built by
:class:`~tokengate.lanes.process.ChildProcess` (:meth:`~tokengate.lanes.process.ChildProcess.stats`);
:meth:`ProcessPoolLane.stats <tokengate.lanes.pool.ProcessPoolLane.stats>` returns one per process.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ProcessState", "ProcessStats"]


class ProcessState(str, enum.Enum):
    """Where a :class:`ChildProcess` handle is."""

    NEW = "new"                # never started
    STARTING = "starting"
    IDLE = "idle"              # running, waiting for a call
    BUSY = "busy"              # a call is in flight
    CRASHED = "crashed"        # died on its own; replaced before the next call
    TERMINATED = "terminated"  # ended on purpose; replaced before the next call
    CLOSED = "closed"          # closed for good


@dataclass(frozen=True)
class ProcessStats:
    """A snapshot of one worker process handle (JSON-ready through :meth:`as_dict`)."""

    name: str
    pid: int | None
    state: str
    rss_bytes: int | None
    calls: int                # calls run by this handle, over all its processes
    calls_since_start: int    # calls run by the current process
    restarts: int             # replacements of any cause
    crashes: int
    terminations: int
    recycles: int
    startup_seconds: float | None  # the current process's start-up
    recycle_due: str | None   # why the current process will be replaced before the next call

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)

