"""A fixed set of warm worker processes: :class:`ProcessPoolLane`.

The pool starts all its processes together, off the request path (the
coordinator starts it with itself, and ``/ready`` waits for it), and hands them
out two ways:

* by index (``pool[i]``), so each process-lane worker thread of a coordinator
  owns one process for life (a sticky key pinned to that worker then really
  reuses that process's caches);
* with :meth:`ProcessPoolLane.acquire` / :meth:`ProcessPoolLane.release`, most
  recently used first (its imports and caches are warm). A handle released
  with a dead, terminated or due-for-recycling process is replaced on the
  pool's replacer thread before anyone gets it again.

:meth:`ProcessPoolLane.stop` ends every process and joins the replacer; it
never leaves a child behind.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Iterable, Mapping, Sequence

import psutil

from ..errors import ConfigurationError, LaneClosed, ProcessLaneError, WorkerCrashed, WorkerTerminated
from ._chunks import DEFAULT_MAX_CHUNK, chunk_payload, crashed_batch, terminated_batch
from ._outcomes import Batch, Outcome
from ._state import ProcessStats
from .process import ChildProcess
from .references import FunctionRef

__all__ = ["ProcessPoolLane", "usable_cpus"]

logger = logging.getLogger("tokengate.lanes")


def usable_cpus() -> int:
    """Logical CPUs in this process's affinity mask (psutil), else ``os.cpu_count()``, at least 1."""
    try:
        return max(1, len(psutil.Process().cpu_affinity() or ()))
    except (AttributeError, psutil.Error, OSError):  # no affinity API on this platform
        return max(1, os.cpu_count() or 1)


class ProcessPoolLane:
    """*size* worker processes, started together and kept warm.

    Args:
        size: number of processes (default: :func:`usable_cpus`).
        name: prefix of the processes' names (``<name>-<i>``) and of the replacer thread.
        **options: passed to every :class:`ChildProcess` (``preload``,
            ``max_calls``, ``max_rss``, ``rss_check_interval``, ``start_method``,
            ``start_timeout``, ``terminate_grace``).

    Raises:
        ConfigurationError: for an invalid size or option.
    """

    def __init__(self, size: int | None = None, *, name: str = "tokengate-process", **options: Any) -> None:
        if size is None:
            size = usable_cpus()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"size must be a positive int, got {size!r}")
        self.name = name
        self._handles = tuple(ChildProcess(name=f"{name}-{i}", **options) for i in range(size))
        self._cond = threading.Condition()
        self._idle: deque[ChildProcess] = deque()
        self._to_replace: deque[ChildProcess] = deque()
        self._started = False
        self._stopped = False
        self._replacer: threading.Thread | None = None
        self._replacements = 0

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, index: int) -> ChildProcess:
        """The handle at *index*, for a caller that owns it for life (one per worker thread)."""
        return self._handles[index]

    @property
    def handles(self) -> tuple[ChildProcess, ...]:
        """Every handle, in index order."""
        return self._handles

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and :meth:`stop`."""
        return self._started and not self._stopped

    def stats(self) -> list[ProcessStats]:
        """One :class:`ProcessStats` per process, in index order."""
        return [handle.stats() for handle in self._handles]

    def totals(self) -> dict[str, int]:
        """Sums over the pool: calls, restarts, crashes, terminations, recycles, and replacements done by the pool."""
        stats = self.stats()
        return {
            "processes": len(stats),
            "calls": sum(s.calls for s in stats),
            "restarts": sum(s.restarts for s in stats),
            "crashes": sum(s.crashes for s in stats),
            "terminations": sum(s.terminations for s in stats),
            "recycles": sum(s.recycles for s in stats),
            "background_replacements": self._replacements,
        }

    # --------------------------------------------------------------- lifecycle

    def start(self) -> list[float]:
        """Start every process, in parallel; return their start-up times in seconds (index order).

        All processes are launched first, then waited for, so the pool is ready
        in about one start-up time, not *size* of them. Idempotent.

        Raises:
            WorkerStartFailed: a process could not start (the pool is stopped again, nothing left running).
            LaneClosed: the pool was stopped.
        """
        with self._cond:
            if self._stopped:
                raise LaneClosed(f"{self.name} pool is stopped")
            if self._started:
                return [handle.stats().startup_seconds or 0.0 for handle in self._handles]
        try:
            for handle in self._handles:
                handle.launch()
            times = [handle.wait_ready() for handle in self._handles]
        except BaseException:
            self.stop()
            raise
        with self._cond:
            self._idle.extend(self._handles)
            self._started = True
            self._replacer = threading.Thread(target=self._replace_loop, name=f"{self.name}-replacer", daemon=True)
            self._replacer.start()
            self._cond.notify_all()
        logger.info("%s: %d processes ready (start-up %.3f–%.3f s)", self.name, len(times), min(times), max(times))
        return times

    def stop(self, timeout: float = 0.0) -> None:
        """End every process and the replacer thread; idempotent.

        Calls in progress get up to *timeout* seconds (in all) to finish, then
        their processes are terminated (they raise ``WorkerTerminated`` with
        reason ``"closed"``). Waiting ``acquire()`` calls raise ``LaneClosed``.
        """
        with self._cond:
            self._stopped = True
            self._idle.clear()
            self._cond.notify_all()
            replacer = self._replacer
        deadline = time.monotonic() + max(0.0, timeout)
        for handle in self._handles:
            handle.close(max(0.0, deadline - time.monotonic()))
        if replacer is not None and replacer is not threading.current_thread():
            replacer.join()

    def __enter__(self) -> ProcessPoolLane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------- acquire/release

    def acquire(self, timeout: float | None = None) -> ChildProcess:
        """Take an idle handle (the most recently used first), waiting up to *timeout* seconds.

        Raises:
            TimeoutError: none became idle in time.
            LaneClosed: the pool is stopped (or not started).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._stopped or not self._started:
                    raise LaneClosed(f"{self.name} pool is {'stopped' if self._stopped else 'not started'}")
                if self._idle:
                    return self._idle.pop()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no idle process in {self.name} pool within {timeout} s")
                self._cond.wait(remaining)

    def release(self, handle: ChildProcess) -> None:
        """Give a handle back. One whose process must be replaced is replaced first, on the replacer thread."""
        if handle not in self._handles:
            raise ValueError(f"{handle!r} does not belong to the {self.name} pool")
        with self._cond:
            if self._stopped:
                return
            if handle.needs_restart:
                self._to_replace.append(handle)
            else:
                self._idle.append(handle)
            self._cond.notify_all()

    def _replace_loop(self) -> None:
        while True:
            with self._cond:
                while not self._to_replace and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                handle = self._to_replace.popleft()
            try:
                handle.restart("replacement")
                self._replacements += 1
            except ProcessLaneError as exc:
                # Handed out anyway: its next call tries the start again and raises to that caller.
                logger.warning("%s: replacing %s failed: %s", self.name, handle.name, exc)
            except Exception:  # noqa: BLE001 - the replacer must outlive any single failure
                logger.exception("%s: replacing %s failed", self.name, handle.name)
            with self._cond:
                if not self._stopped:
                    self._idle.append(handle)
                    self._cond.notify_all()

    # ------------------------------------------------------------------- calls

    def call(
        self, ref: FunctionRef, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, *,
        timeout: float | None = None,
    ) -> Outcome[Any]:
        """Run one call on an idle process (see :meth:`ChildProcess.call`)."""
        handle = self.acquire()
        try:
            return handle.call(ref, args, kwargs, timeout=timeout)
        finally:
            self.release(handle)

    def call_many(
        self, ref: FunctionRef, items: Iterable[tuple[tuple[Any, ...], Mapping[str, Any] | None]], *,
        chunksize: int | None = None,
    ) -> list[Outcome[Any]]:
        """Run many calls spread over every process; one :class:`Outcome` per item, in order.

        See :meth:`call_batch`.
        """
        return self.call_batch(ref, items, chunksize=chunksize).outcomes()

    def call_batch(
        self, ref: FunctionRef, items: Iterable[tuple[tuple[Any, ...], Mapping[str, Any] | None]], *,
        chunksize: int | None = None,
    ) -> Batch:
        """Run many calls spread over the idle processes, a chunk per message; a :class:`Batch` in order.

        The default *chunksize* gives each process about four chunks (at most
        :data:`~tokengate.lanes._chunks.DEFAULT_MAX_CHUNK` items), so a slow
        chunk does not leave the other processes idle. The calling thread
        drives every process it takes (waits for at least one, takes the others
        that are idle now), one chunk in flight per process: it pickles the
        next chunk while the processes compute, and no second Python thread
        competes with it for the GIL. Per-item outcomes are as
        :meth:`ChildProcess.call_batch`'s; a termination of any of its
        processes fails the rest of the batch with ``WorkerTerminated``.

        Raises:
            WorkerStartFailed: a replacement process could not be started.
            LaneClosed: the pool is stopped.
        """
        pending = items if isinstance(items, list) else list(items)
        if not pending:
            return Batch([], {})
        if chunksize is None:
            chunksize = max(1, min(DEFAULT_MAX_CHUNK, math.ceil(len(pending) / (4 * len(self._handles)))))
        elif isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ConfigurationError(f"chunksize must be a positive int, got {chunksize!r}")
        chunks = [pending[i:i + chunksize] for i in range(0, len(pending), chunksize)]
        results: list[Batch | None] = [None] * len(chunks)
        handles = [self.acquire()]
        while len(handles) < len(chunks):
            extra = self._take_idle()
            if extra is None:
                break
            handles.append(extra)
        in_flight: dict[ChildProcess, int] = {}
        cursor = 0
        stopped: WorkerTerminated | None = None

        def dispatch(handle: ChildProcess) -> None:
            nonlocal cursor, stopped
            while cursor < len(chunks) and stopped is None:
                index, cursor = cursor, cursor + 1
                payload = chunk_payload(ref, chunks[index])
                if payload is None:  # an item does not pickle: this chunk goes item by item
                    results[index] = handle._run_items_one_by_one(ref, chunks[index])
                    continue
                try:
                    handle._send_request(payload)
                except WorkerTerminated as exc:  # terminated while its replacement started
                    results[index] = terminated_batch(exc, len(chunks[index]))
                    stopped = exc
                    return
                in_flight[handle] = index
                return

        try:
            for handle in handles:
                dispatch(handle)
            while in_flight:
                watched = {obj: handle for handle in in_flight for obj in handle._wait_objects()}
                for handle in {watched[obj] for obj in wait(list(watched))}:
                    index = in_flight.pop(handle)
                    size = len(chunks[index])
                    try:
                        data = handle._receive_reply(None, size)
                    except WorkerCrashed as exc:
                        results[index] = crashed_batch(exc, size)
                    except WorkerTerminated as exc:
                        results[index] = terminated_batch(exc, size)
                        stopped = exc
                    else:
                        results[index] = handle._chunk_result(ref, chunks[index], data)
                    dispatch(handle)
        finally:
            for handle, index in list(in_flight.items()):  # an error left replies out: collect them
                try:
                    handle._receive_reply(None, len(chunks[index]))
                except ProcessLaneError:
                    pass
            for handle in handles:
                self.release(handle)
        batch = Batch([], {})
        for index, result in enumerate(results):
            if result is None:  # never sent: the batch was stopped by a termination
                assert stopped is not None
                result = terminated_batch(stopped, len(chunks[index]))
            batch.extend(result)
        return batch

    def _take_idle(self) -> ChildProcess | None:
        with self._cond:
            if self._stopped or not self._idle:
                return None
            return self._idle.pop()
