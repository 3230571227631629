"""Lanes: how a routed call is executed. This package holds the process lane's engine room.

* :class:`ChildProcess` — one worker process: start (forkserver/spawn, timed),
  blocking ``call``/``call_many``, ``terminate`` from any thread, recycling,
  crash containment, statistics; and, for a user that does its own I/O on the
  pipe (the coordinator's process lane, :mod:`tokengate.lanes.process_worker`,
  which pipelines calls from the event loop through :mod:`tokengate.lanes._link`),
  ``endpoints``/``count_calls``/``signal_end``/``reap``.
* :class:`ProcessPoolLane` — N warm handles started together off the request
  path, handed out by index or with ``acquire``/``release``; ``stop()`` leaves
  no process behind.
* :class:`FunctionRef`, :func:`reference_to`, :func:`check_importable` — how a
  function travels: by module and qualified name, checked at decoration time.

Nothing of the caller's :mod:`contextvars` context crosses into a worker
process, and a decorated function called inside one raises
:class:`~tokengate.errors.NestedCallRefused` (call ``fn.__wrapped__`` to run it
inline there). See :mod:`tokengate.lanes.process` for the details.
"""

from __future__ import annotations

from ._outcomes import Batch, Outcome, RemoteTraceback
from ._start import default_start_method, preload_in_forkserver
from ._state import ProcessState, ProcessStats
from .pool import ProcessPoolLane
from .process import ChildProcess
from .references import FunctionRef, check_importable, reference_to, resolve_reference

__all__ = [
    "Batch",
    "ChildProcess",
    "FunctionRef",
    "Outcome",
    "ProcessPoolLane",
    "ProcessState",
    "ProcessStats",
    "RemoteTraceback",
    "check_importable",
    "default_start_method",
    "preload_in_forkserver",
    "reference_to",
    "resolve_reference",
]
