"""How the process lane starts a worker process: which start method, the forkserver's preload, no GC meanwhile.

:func:`default_start_method` and :func:`preload_in_forkserver` are public
(re-exported by :mod:`tokengate.lanes`); :func:`context` turns a handle's
``start_method`` option into a :mod:`multiprocessing` context (refusing
``"fork"``) and :func:`no_collection` guards the start itself. Used by
:class:`~tokengate.lanes.process.ChildProcess`, and by
:mod:`tokengate.lanes.references`, whose import check asks which start method a
child will use.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import threading
from typing import Any, Iterator

from ..errors import ConfigurationError

__all__ = ["context", "default_start_method", "no_collection", "preload_in_forkserver"]


def default_start_method() -> str:
    """``"forkserver"`` where the platform has it (POSIX), else ``"spawn"``; never ``"fork"``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def preload_in_forkserver() -> bool:
    """Have the forkserver import tokengate once, so each worker process starts without importing it.

    Opt-in, because it sets multiprocessing's process-wide forkserver preload
    list (to ``["__main__", "tokengate.lanes._child"]``, keeping the default
    ``__main__``). It only takes effect if called before the forkserver starts,
    i.e. before the first process of this program is started by forkserver.
    Measured here: a worker's start-up drops from ~0.15 s (importing tokengate
    in every child) to ~0.01 s, which is also how long a crashed worker's
    replacement takes. Returns False (and does nothing) where the platform
    has no forkserver.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(["__main__", "tokengate.lanes._child"])
    return True


_no_collection_lock = threading.Lock()
_no_collection_depth = 0
_collection_was_enabled = True


@contextlib.contextmanager
def no_collection() -> Iterator[None]:
    """No automatic garbage collection starts in this block (an explicit ``gc.collect()`` still would).

    Making a lock and starting a process call into multiprocessing's resource
    tracker. A collection starting inside those calls may free an earlier
    process's lock (kept by a reference cycle), whose finalizer calls the
    tracker again: unsupported (CPython gh-109629), the semaphore's name may
    leak and Python warns. The block is short: the collection runs after it.
    """
    global _no_collection_depth, _collection_was_enabled
    with _no_collection_lock:  # several processes may start at once: the last one out re-enables
        if _no_collection_depth == 0:
            _collection_was_enabled = gc.isenabled()
            gc.disable()
        _no_collection_depth += 1
    try:
        yield
    finally:
        with _no_collection_lock:
            _no_collection_depth -= 1
            if _no_collection_depth == 0 and _collection_was_enabled:
                gc.enable()


def context(start_method: str | None) -> Any:
    # Any: typeshed gives the forkserver and spawn contexts no common type with Process.
    method = start_method if start_method is not None else default_start_method()
    if method == "fork":
        raise ConfigurationError(
            "start_method='fork' is refused: forking a parent that runs threads (the coordinator's) can copy a "
            "lock another thread holds and hang the child; use 'forkserver' (POSIX) or 'spawn'")
    if method not in ("forkserver", "spawn") or method not in multiprocessing.get_all_start_methods():
        raise ConfigurationError(
            f"start_method must be one of {[m for m in ('forkserver', 'spawn') if m in multiprocessing.get_all_start_methods()]}, got {method!r}")
    return multiprocessing.get_context(method)
