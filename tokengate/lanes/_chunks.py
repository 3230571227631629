"""A batch in chunks: how many items travel per message, a chunk's request, and a lost chunk's outcomes.

A batch crosses to a worker process one chunk per message (at most
:data:`DEFAULT_MAX_CHUNK` items by default). :func:`chunk_payload` pickles a
chunk's request (see :mod:`tokengate.lanes._child` for the protocol);
:func:`crashed_batch` and :func:`terminated_batch` are the outcomes of a chunk
whose process died or was terminated, one copy of the error per item. Used by
:meth:`ChildProcess.call_batch <tokengate.lanes.process.ChildProcess.call_batch>`
and :meth:`ProcessPoolLane.call_many <tokengate.lanes.pool.ProcessPoolLane.call_many>`.
"""

from __future__ import annotations

import pickle
from typing import Any, Mapping

from ..errors import ConfigurationError, WorkerCrashed, WorkerTerminated
from ._child import MANY, MANY_ARGS, PROTOCOL
from ._outcomes import Batch
from .references import FunctionRef

__all__ = [
    "DEFAULT_MAX_CHUNK",
    "check_chunksize",
    "chunk_payload",
    "copy_terminated",
    "crashed_batch",
    "terminated_batch",
]

#: The most items :meth:`ProcessPoolLane.call_many` puts in one message by default:
#: large enough to amortise a round trip, small enough that a crash costs little.
DEFAULT_MAX_CHUNK = 1024


def check_chunksize(chunksize: int) -> int:
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ConfigurationError(f"chunksize must be a positive int, got {chunksize!r}")
    return chunksize


def chunk_payload(ref: FunctionRef, chunk: list[tuple[tuple[Any, ...], Mapping[str, Any] | None]]) -> bytes | None:
    try:
        # Most batches have no keywords: then only the argument tuples travel.
        args_only = [args for args, kwargs in chunk if not kwargs]
    except (TypeError, ValueError):  # an item is not an (args, kwargs) pair: the child reports it for that item
        args_only = []
    try:
        if len(args_only) == len(chunk):
            return pickle.dumps((MANY_ARGS, ref.module, ref.qualname, args_only), PROTOCOL)
        return pickle.dumps((MANY, ref.module, ref.qualname, chunk), PROTOCOL)
    except Exception:  # noqa: BLE001 - None: the caller sends the items one by one
        return None


def crashed_batch(exc: WorkerCrashed, size: int) -> Batch:
    return Batch([None] * size, {i: _copy_crashed(exc) for i in range(size)})


def terminated_batch(exc: WorkerTerminated, size: int) -> Batch:
    return Batch([None] * size, {i: copy_terminated(exc) for i in range(size)})


def _copy_crashed(exc: WorkerCrashed) -> WorkerCrashed:
    return WorkerCrashed(str(exc), pid=exc.pid, exitcode=exc.exitcode, signal_name=exc.signal_name)


def copy_terminated(exc: WorkerTerminated) -> WorkerTerminated:
    return WorkerTerminated(str(exc), pid=exc.pid, reason=exc.reason)
