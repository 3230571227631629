"""One worker process per handle: :class:`ChildProcess`.

This is the engine room of the process lane: it runs a function, named by a
:class:`~tokengate.lanes.references.FunctionRef`, in another Python process and
brings its outcome back, and it survives everything a process can do to it.
A warm pool of handles is :class:`~tokengate.lanes.pool.ProcessPoolLane`; the
coordinator's process lane (:mod:`tokengate.lanes.process_worker`) gives each
of its workers one handle for life. The handle is built from
:mod:`~tokengate.lanes._start` (how a process starts),
:mod:`~tokengate.lanes._pipes` (its two pipes), :mod:`~tokengate.lanes._state`
(its state and statistics), :mod:`~tokengate.lanes._outcomes` (what a call
returns) and :mod:`~tokengate.lanes._chunks` (batches in chunks).

* **Start**: processes start by ``forkserver`` on POSIX and ``spawn`` elsewhere,
  never plain ``fork`` (forking a threaded parent can copy a lock held by
  another thread and deadlock the child). ``start()`` waits for the child to
  report ready and returns how long that took.
* **Outcome**: the function's own exception arrives unchanged in type, its
  ``__cause__`` a :class:`~tokengate.lanes.RemoteTraceback` holding the
  child's formatted traceback (as :mod:`concurrent.futures` does). One that does not pickle
  arrives as :class:`~tokengate.errors.RemoteError`. Arguments or a result that
  do not pickle give :class:`~tokengate.errors.PicklingFailed` for that call
  only; the process stays usable.
* **Crashes cost one call**: the parent waits on the pipe *and* the process's
  sentinel (never a bare ``recv``), so a child that dies (segfault,
  ``os._exit``, SIGKILL, the OOM killer) makes the running call raise
  :class:`~tokengate.errors.WorkerCrashed` and the next call starts a
  replacement.
* **Stopping work for real**: :meth:`ChildProcess.terminate` may be called from
  any thread while a call is blocked; it sends SIGTERM, the blocked call
  escalates to SIGKILL after ``terminate_grace`` seconds and raises
  :class:`~tokengate.errors.WorkerTerminated`.
* **Recycling**: ``max_calls`` and ``max_rss`` (resident bytes, read with
  psutil between calls) retire a process before its next call.
* **Batching**: :meth:`ChildProcess.call_many` ships one message per chunk.
* **Pipelining** (the coordinator's process lane): :meth:`ChildProcess.endpoints`
  hands the pipe, the sentinel and the shared slot states to a user that does
  its own non-blocking I/O (see :mod:`tokengate.lanes._child` for the protocol
  and :mod:`tokengate.lanes.process_worker` for the user);
  :meth:`~ChildProcess.signal_end` never blocks, and :meth:`~ChildProcess.reap`
  classifies a death once the sentinel fired.

**Context variables do not cross.** Nothing of the caller's
:mod:`contextvars` context reaches the child (a context does not pickle), and
each request runs in a fresh, empty context in the child (a call, or one chunk
of a batch, whose items share it as calls in a loop would), so nothing one call
sets is seen by the next. Pass what a function needs as arguments.

**Nested decorated calls** made inside a child raise
:class:`~tokengate.errors.NestedCallRefused` (a
:class:`~tokengate.errors.CoordinatorNotRunning`): there is no coordinator in a
worker process. ``fn.__wrapped__(...)`` runs the plain function inline there.

Nothing here logs on the call path; starts, crashes, terminations and recycles
are logged on ``tokengate.lanes``.
"""

from __future__ import annotations

import atexit
import logging
import math
import pickle
import select
import signal
import socket
import threading
import time
import weakref
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any, Iterable, Mapping, Sequence

import psutil

from ..errors import ConfigurationError, LaneClosed, WorkerCrashed, WorkerStartFailed, WorkerTerminated
from . import _child
from ._child import CALL, PROTOCOL, READY, START_FAILED, UNLOADABLE_REQUEST
from ._chunks import DEFAULT_MAX_CHUNK, check_chunksize, chunk_payload, copy_terminated, crashed_batch
from ._outcomes import Batch, Outcome, decode, failure, pickling_failed
from ._pipes import PipePair
from ._start import context, no_collection
from ._state import ProcessState, ProcessStats
from .references import FunctionRef

__all__ = ["ChildProcess"]

logger = logging.getLogger("tokengate.lanes")


_HAVE_POLL = hasattr(select, "poll")
# What a wait for a reply found.
_REPLY, _WAKE, _DIED, _TIMEOUT = object(), object(), object(), object()


# Every handle with a live process, so that interpreter exit never waits for a
# child: multiprocessing's own exit hook joins non-daemon children, and ours
# (registered later, so run first) ends them. Children are not daemonic so that
# a function may start processes of its own.
_live: "weakref.WeakSet[ChildProcess]" = weakref.WeakSet()
_live_lock = threading.Lock()


def _close_all_at_exit() -> None:
    with _live_lock:
        handles = list(_live)
    for handle in handles:
        try:
            handle.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            logger.exception("closing %s at exit failed", handle)


atexit.register(_close_all_at_exit)


def _exit_description(exitcode: int | None) -> tuple[str | None, str]:
    if exitcode is None:
        return None, "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return name, f"killed by {name}"
    return None, f"exit code {exitcode}"


class ChildProcess:
    """A handle on one worker process: start it, call functions in it, stop or replace it.

    ``call()`` and ``call_many()`` are blocking and may be used from one thread
    at a time (a second concurrent caller gets ``RuntimeError``); ``terminate()``,
    ``stats()`` and ``close()`` may be called from any thread. A process that
    died or was terminated is replaced at the start of the next call (a pool can
    call :meth:`restart` earlier, off the request path).

    Args:
        name: process name (shows in ``ps`` and in errors).
        preload: modules the child imports before it reports ready, so the
            first call does not pay for them (an import error fails the start).
        max_calls: replace the process after this many calls (None: never).
        max_rss: replace the process when its resident memory exceeds this many
            bytes, checked after a call, at most every ``rss_check_interval``
            seconds (None: never).
        start_method: ``"forkserver"`` or ``"spawn"`` (default:
            :func:`default_start_method`). ``"fork"`` is refused.
        start_timeout: seconds a start may take before it fails.
        terminate_grace: seconds between SIGTERM and SIGKILL when terminating.

    Raises:
        ConfigurationError: for an invalid option.
    """

    def __init__(
        self,
        *,
        name: str = "tokengate-process",
        preload: Sequence[str] = (),
        max_calls: int | None = None,
        max_rss: int | None = None,
        rss_check_interval: float = 1.0,
        start_method: str | None = None,
        start_timeout: float = 60.0,
        terminate_grace: float = 0.5,
    ) -> None:
        self._ctx = context(start_method)
        if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1):
            raise ConfigurationError(f"max_calls must be a positive int or None, got {max_calls!r}")
        if max_rss is not None and (isinstance(max_rss, bool) or not isinstance(max_rss, int) or max_rss < 1):
            raise ConfigurationError(f"max_rss must be a positive number of bytes or None, got {max_rss!r}")
        for label, value in (("rss_check_interval", rss_check_interval), ("start_timeout", start_timeout),
                             ("terminate_grace", terminate_grace)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigurationError(f"{label} must be a number of seconds >= 0, got {value!r}")
        if isinstance(preload, str) or not all(isinstance(m, str) and m for m in preload):
            raise ConfigurationError(f"preload must be a sequence of module names, got {preload!r}")
        self.name = name
        self._preload = tuple(preload)
        self._max_calls = max_calls
        self._max_rss = max_rss
        self._rss_check_interval = float(rss_check_interval)
        self._start_timeout = float(start_timeout)
        self._grace = float(terminate_grace)

        self._lock = threading.Lock()        # guards the fields below; held while reaping the process
        self._call_lock = threading.Lock()   # one caller at a time; whoever holds it owns the process's lifecycle
        self._process: BaseProcess | None = None
        self._conn: PipePair | None = None
        self._ps: psutil.Process | None = None
        self._alive = False                  # started and not yet reaped: signalling its pid is safe
        self._busy = False                   # a call (or its restart) is in progress
        self._closed = False
        self._state = ProcessState.NEW
        self._terminate_reason: str | None = None
        self._recycle_due: str | None = None
        self._last_rss_check = 0.0
        self._launched_at = 0.0
        self._wake_pending = False  # a wake byte may be unread: drain before the next call
        self._poller: Any = None  # select.poll over (pipe, sentinel, wake) of the current process
        self._poll_fds: tuple[int, int] = (-1, -1)
        # terminate() pokes this so a blocked call wakes even if SIGTERM is ignored.
        # Closed by close(), or when the handle is collected unclosed.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._finalizer = weakref.finalize(self, _close_sockets, self._wake_r, self._wake_w)

        self._shared: tuple[Any, Any] | None = None  # the current process's slot states and their lock
        self._pid: int | None = None
        self._startup: float | None = None
        self._calls = 0
        self._calls_since_start = 0
        self._restarts = 0
        self._crashes = 0
        self._terminations = 0
        self._recycles = 0

    # ------------------------------------------------------------------ info

    @property
    def pid(self) -> int | None:
        """The current process's id (None before the first start)."""
        return self._pid

    @property
    def state(self) -> ProcessState:
        """Where the handle is (see :class:`ProcessState`)."""
        return self._state

    @property
    def needs_restart(self) -> bool:
        """True when the next call would first start a process (dead, terminated, never started or due for recycling)."""
        return not self._closed and (not self._alive or self._recycle_due is not None)

    def stats(self) -> ProcessStats:
        """A snapshot: pid, state, resident memory, counters, start-up seconds."""
        with self._lock:
            ps = self._ps if self._alive else None
            snapshot = dict(
                name=self.name, pid=self._pid, state=self._state.value, calls=self._calls,
                calls_since_start=self._calls_since_start, restarts=self._restarts, crashes=self._crashes,
                terminations=self._terminations, recycles=self._recycles, startup_seconds=self._startup,
                recycle_due=self._recycle_due)
        rss: int | None = None
        if ps is not None:
            try:
                rss = int(ps.memory_info().rss)
            except (psutil.Error, OSError):
                rss = None
        return ProcessStats(rss_bytes=rss, **snapshot)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<ChildProcess {self.name} pid={self._pid} state={self._state.value}>"

    # ------------------------------------------------------------- lifecycle

    def start(self) -> float:
        """Start the process if it is not running; return its start-up time in seconds.

        Blocks until the child reports ready. Does nothing (and returns the
        current process's start-up time) when a process is already running.

        Raises:
            WorkerStartFailed: the child exited, timed out, or a preload import failed.
            WorkerTerminated: :meth:`terminate` was called during the start.
            LaneClosed: the handle was closed.
        """
        with self._call_lock:
            with self._lock:
                if self._closed:
                    raise LaneClosed(f"{self.name} is closed")
                self._busy = True
            try:
                if not self._alive or self._startup is None:
                    self._start_locked()
                return self._startup or 0.0
            finally:
                self._leave()

    def restart(self, reason: str = "restart") -> float:
        """Replace the process now (gracefully: the old one finishes nothing, it is idle); return start-up seconds.

        Waits for a call in progress to finish first.
        """
        with self._call_lock:
            with self._lock:
                if self._closed:
                    raise LaneClosed(f"{self.name} is closed")
                self._busy = True
            try:
                self._replace(reason)
                return self._startup or 0.0
            finally:
                self._leave()

    def launch(self) -> None:
        """Begin starting the process without waiting for it to be ready (see :meth:`wait_ready`).

        A pool launches all its processes, then waits for them together.
        """
        with self._call_lock:
            with self._lock:
                if self._closed:
                    raise LaneClosed(f"{self.name} is closed")
            if not self._alive:
                self._launch()

    def wait_ready(self) -> float:
        """Wait for a process begun with :meth:`launch` to be ready; return its start-up seconds."""
        return self.start()

    def terminate(self, reason: str = "terminated") -> bool:
        """End the current process now (SIGTERM, then SIGKILL after ``terminate_grace``).

        Callable from any thread. A call blocked on this handle raises
        :class:`~tokengate.errors.WorkerTerminated` carrying *reason* within
        about ``terminate_grace`` seconds; this method then returns at once.
        With no call in progress it ends the process before returning. The next
        call starts a replacement. Returns False when there was no process.
        """
        with self._lock:
            if not self._alive:
                return False
            self._terminate_reason = reason
            if self._busy:
                self._signal(signal.SIGTERM)
                self._wake_pending = True
                try:
                    self._wake_w.send(b"x")
                except OSError:  # the wake socket is full: a wake-up is pending anyway
                    pass
                return True
        # Idle (or a call is just leaving): do it here, as the owner of the process.
        with self._call_lock:
            self._handle_terminate_request()
        return True

    def close(self, timeout: float = 0.0) -> None:
        """Close the handle for good: end the process and free the pipe. Idempotent.

        A call in progress gets up to *timeout* seconds to finish, then is
        terminated (it raises ``WorkerTerminated`` with reason ``"closed"``).
        An idle process exits on its own when its pipe closes; one that does not
        within ``terminate_grace`` is killed. Later calls raise ``LaneClosed``.
        """
        with self._lock:
            already = self._closed
            self._closed = True
        if already and self._state is ProcessState.CLOSED:
            return
        owned = self._call_lock.acquire(timeout=timeout) if timeout > 0 else self._call_lock.acquire(blocking=False)
        if not owned:
            self.terminate("closed")  # the running call raises WorkerTerminated(reason="closed") and lets go
            self._call_lock.acquire()
        try:
            self._stop_process(graceful=True)
            with self._lock:
                self._state = ProcessState.CLOSED
                shared, self._shared = self._shared, None
            # Its lock is a named semaphore: dropping the last reference unlinks it now. At
            # interpreter exit multiprocessing would, but not when the program ends by a signal
            # (uvicorn re-raises SIGTERM after its shutdown): the resource tracker then warns of
            # "leaked semaphore objects". The unlink calls the tracker: no collection inside it.
            with no_collection():
                del shared
            self._finalizer()
        finally:
            self._call_lock.release()

    def __enter__(self) -> ChildProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------ pipelined use (the process lane's event loop)

    def endpoints(self) -> tuple[int, int, int, Any, Any, int]:
        """The running process's reply pipe fd (read), request pipe fd (write), sentinel fd, shared slot
        states, their lock and its pid.

        For a caller that does its own I/O on the pipe (pipelined batches, see
        :mod:`tokengate.lanes._child`); it then owns the pipe until the process
        dies (:meth:`reap`) or it hands the handle back to :meth:`restart` or
        :meth:`close`, and must not use :meth:`call` meanwhile.

        Raises:
            WorkerStartFailed: no process is running and ready.
        """
        with self._lock:
            process, conn, shared = self._process, self._conn, self._shared
            if not self._alive or self._startup is None or process is None or conn is None or shared is None:
                raise WorkerStartFailed(f"{self.name}: no worker process is running")
            self._state = ProcessState.IDLE
            return conn.fileno(), conn.write_fileno(), process.sentinel, shared[0], shared[1], process.pid or 0

    def count_calls(self, calls: int, busy: bool) -> str | None:
        """Count *calls* finished by a pipelined user; return why the process is now due for recycling, or None."""
        self._calls += calls
        self._calls_since_start += calls
        with self._lock:
            if self._state in (ProcessState.IDLE, ProcessState.BUSY):
                self._state = ProcessState.BUSY if busy else ProcessState.IDLE
        self._check_recycle()
        return self._recycle_due

    def calls_left(self) -> int | None:
        """Calls the current process may still take before ``max_calls`` recycles it (None: no limit)."""
        return None if self._max_calls is None else self._max_calls - self._calls_since_start

    def signal_end(self, reason: str, *, kill: bool = False) -> bool:
        """Send the current process SIGTERM (SIGKILL with *kill*), recording *reason*; never blocks. Thread: any.

        For a pipelined user: the process's death then shows on its sentinel,
        and :meth:`reap` reports it as ``WorkerTerminated`` with *reason*.
        False when no process is alive.
        """
        with self._lock:
            if not self._alive:
                return False
            if self._terminate_reason is None:
                self._terminate_reason = reason
            self._signal(signal.SIGKILL if kill else signal.SIGTERM)
            return True

    def reap(self, during: str) -> BaseException:
        """The process died (its sentinel fired): reap it, count it, return its ``WorkerCrashed``/``WorkerTerminated``."""
        with self._call_lock:
            return self._died(during)

    # ----------------------------------------------------------------- calls

    def call(
        self, ref: FunctionRef, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, *,
        timeout: float | None = None,
    ) -> Outcome[Any]:
        """Run ``ref(*args, **kwargs)`` in the process and return its :class:`Outcome`. Blocking.

        The outcome holds the function's value or its own exception (unchanged
        in type, ``__cause__`` a :class:`~tokengate.lanes.RemoteTraceback`), a ``RemoteError``
        for an exception that could not be sent back, or ``PicklingFailed`` for
        arguments or a result that could not cross (the process stays usable).

        Args:
            timeout: seconds to wait for the reply; past it the process is
                terminated and ``WorkerTerminated(reason="timeout")`` raised.

        Raises:
            WorkerCrashed: the process died during the call.
            WorkerTerminated: :meth:`terminate` was called (or *timeout* passed) during the call.
            WorkerStartFailed: a replacement process could not be started.
            LaneClosed: the handle was closed.
            RuntimeError: another thread is using this handle.
        """
        try:
            payload = pickle.dumps((CALL, ref.module, ref.qualname, args, dict(kwargs) if kwargs else None), PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - whatever pickling raises is this call's outcome
            return failure(pickling_failed(ref, "arguments", exc))
        data = self._round_trip(payload, timeout, 1)
        try:
            item = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - the reply does not unpickle here
            return failure(pickling_failed(ref, "result", exc))
        return decode(ref, item)

    def call_many(
        self, ref: FunctionRef, items: Iterable[tuple[tuple[Any, ...], Mapping[str, Any] | None]], *,
        chunksize: int | None = None,
    ) -> list[Outcome[Any]]:
        """Run ``ref(*args, **kwargs)`` for each ``(args, kwargs)`` item; return the outcomes in order. Blocking.

        Items travel *chunksize* per message (default: all of them, at most
        :data:`DEFAULT_MAX_CHUNK`). Each item's outcome is as :meth:`call`'s,
        with two differences, because a batch cannot raise for some items only:
        if the process dies during a chunk, every item of that chunk gets a
        ``WorkerCrashed`` outcome (some may have run) and later chunks run on a
        replacement; if it is terminated, that chunk and every later item get
        ``WorkerTerminated`` outcomes and nothing more runs.
        :meth:`call_batch` returns the same as a :class:`Batch`, without an
        object per item.

        Raises:
            WorkerStartFailed, LaneClosed, RuntimeError: as :meth:`call`.
        """
        return self.call_batch(ref, items, chunksize=chunksize).outcomes()

    def call_batch(
        self, ref: FunctionRef, items: Iterable[tuple[tuple[Any, ...], Mapping[str, Any] | None]], *,
        chunksize: int | None = None,
    ) -> Batch:
        """As :meth:`call_many`, returning a :class:`Batch` (values, and errors by index)."""
        pending = items if isinstance(items, list) else list(items)
        size = check_chunksize(chunksize) if chunksize is not None else min(len(pending), DEFAULT_MAX_CHUNK) or 1
        batch = Batch([], {})
        for start in range(0, len(pending), size):
            chunk = pending[start:start + size]
            try:
                batch.extend(self._run_chunk(ref, chunk))
            except WorkerTerminated as exc:
                done = len(batch)
                batch.extend(Batch([None] * (len(pending) - done),
                                   {i: copy_terminated(exc) for i in range(len(pending) - done)}))
                break
        return batch

    def _run_chunk(self, ref: FunctionRef, chunk: list[tuple[tuple[Any, ...], Mapping[str, Any] | None]]) -> Batch:
        payload = chunk_payload(ref, chunk)
        if payload is None:  # some item does not pickle: fail just those items
            return self._run_items_one_by_one(ref, chunk)
        try:
            data = self._round_trip(payload, None, len(chunk))
        except WorkerCrashed as exc:
            return crashed_batch(exc, len(chunk))
        return self._chunk_result(ref, chunk, data)

    def _chunk_result(self, ref: FunctionRef, chunk: list[tuple[tuple[Any, ...], Mapping[str, Any] | None]],
                      data: bytes) -> Batch:
        try:
            reply = pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - the results do not unpickle here
            return Batch([None] * len(chunk), {i: pickling_failed(ref, "result", exc) for i in range(len(chunk))})
        if isinstance(reply, tuple) and reply and reply[0] == UNLOADABLE_REQUEST:
            # The chunk did not load in the child, so nothing ran: find the culprits item by item.
            return self._run_items_one_by_one(ref, chunk)
        values, errors = reply
        if errors:
            errors = {i: decode(ref, item).error for i, item in errors.items()}
        return Batch(values, errors)

    def _run_items_one_by_one(self, ref: FunctionRef,
                              chunk: list[tuple[tuple[Any, ...], Mapping[str, Any] | None]]) -> Batch:
        batch = Batch([], {})
        for index, (args, kwargs) in enumerate(chunk):
            try:
                outcome = self.call(ref, args, kwargs)
            except WorkerCrashed as exc:
                outcome = failure(exc)
            batch.values.append(outcome.value)
            if outcome.error is not None:
                batch.errors[index] = outcome.error
        return batch

    # -------------------------------------------------------------- internals

    def _round_trip(self, payload: bytes, timeout: float | None, calls: int) -> bytes:
        self._send_request(payload)
        return self._receive_reply(timeout, calls)

    def _send_request(self, payload: bytes) -> None:
        # First half of a round trip: take the handle, make sure a process is
        # ready, send. On success the caller must call _receive_reply, which
        # lets go of the handle whatever happens.
        if not self._call_lock.acquire(blocking=False):
            raise RuntimeError(
                f"{self.name} is already running a call on another thread; use one handle per thread "
                "(ProcessPoolLane.acquire() hands them out)")
        try:
            if self._wake_pending:
                self._drain_wake()  # before _busy: a wake-up that comes after it is meant for this call
            with self._lock:
                if self._closed:
                    raise LaneClosed(f"{self.name} is closed")
                self._busy = True
            if self._terminate_reason is not None:
                self._handle_terminate_request()
            if self._recycle_due is not None or not self._alive or not self._is_running():
                self._replace(self._recycle_due or "replacement")
            elif self._startup is None:  # launched by a pool, not yet waited for
                self._await_ready()
            conn = self._conn
            assert conn is not None
            with self._lock:
                self._state = ProcessState.BUSY
            try:
                conn.send_bytes(payload)
            except OSError:
                pass  # the process is gone; its sentinel says how when the reply is awaited
        except BaseException:
            self._leave()
            self._call_lock.release()
            raise

    def _wait_objects(self) -> list[Any]:
        """What a reply wait watches: the pipe, the process sentinel and the wake socket (for a multi-handle wait)."""
        assert self._conn is not None and self._process is not None
        return [self._conn, self._process.sentinel, self._wake_r]

    def _receive_reply(self, timeout: float | None, calls: int) -> bytes:
        # Second half of a round trip; always lets go of the handle.
        try:
            conn, process = self._conn, self._process
            assert conn is not None and process is not None
            ready = self._wait_reply(conn, process, timeout)
            if ready is _REPLY:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    raise self._died("a call") from None
                self._calls += calls
                self._calls_since_start += calls
                with self._lock:
                    self._state = ProcessState.IDLE
                self._check_recycle()
                return data
            if ready is _WAKE:
                self._drain_wake()
                raise self._terminated_now()
            if ready is _DIED:
                raise self._died("a call")
            with self._lock:
                self._terminate_reason = "timeout"
            raise self._terminated_now()
        finally:
            self._leave()
            self._call_lock.release()

    def _leave(self) -> None:
        # Called by the owner of _call_lock before releasing it: a terminate()
        # that arrived while it was busy but did not end the call is done here.
        with self._lock:
            self._busy = False
        self._handle_terminate_request()

    def _handle_terminate_request(self) -> None:
        with self._lock:
            reason = self._terminate_reason
            self._terminate_reason = None
        if reason is not None and self._alive:
            self._stop_process(graceful=False)
            self._terminations += 1
            self._restarts_pending_state(ProcessState.TERMINATED)
            logger.info("%s: process terminated (%s)", self.name, reason)

    def _restarts_pending_state(self, state: ProcessState) -> None:
        with self._lock:
            if self._state is not ProcessState.CLOSED:
                self._state = state

    def _terminated_now(self) -> WorkerTerminated:
        with self._lock:
            reason = self._terminate_reason or "terminated"
            self._terminate_reason = None
        pid = self._pid
        self._stop_process(graceful=False)
        self._terminations += 1
        self._restarts_pending_state(ProcessState.TERMINATED)
        logger.info("%s: process %s terminated during a call (%s)", self.name, pid, reason)
        return WorkerTerminated(f"{self.name}: process {pid} was terminated during the call ({reason})",
                                pid=pid, reason=reason)

    def _died(self, during: str) -> BaseException:
        process = self._process
        assert process is not None
        wait([process.sentinel], 1.0)  # the sentinel fired (or the pipe closed): the process is (nearly) gone
        with self._lock:
            reason = self._terminate_reason
            self._terminate_reason = None
            process.join(0)
            if process.exitcode is not None:
                self._alive = False
        if self._alive:  # the pipe broke but the process lives on: it cannot be trusted any more
            self._stop_process(graceful=False)
        self._close_conn()
        pid = self._pid
        signame, text = _exit_description(process.exitcode)
        if reason is not None:
            self._terminations += 1
            self._restarts_pending_state(ProcessState.TERMINATED)
            return WorkerTerminated(f"{self.name}: process {pid} was terminated during {during} ({reason})",
                                    pid=pid, reason=reason)
        self._crashes += 1
        self._restarts_pending_state(ProcessState.CRASHED)
        logger.warning("%s: process %s died during %s (%s)", self.name, pid, during, text)
        return WorkerCrashed(f"{self.name}: worker process {pid} died during {during} ({text})",
                             pid=pid, exitcode=process.exitcode, signal_name=signame)

    def _is_running(self) -> bool:
        # An idle child never writes, so a readable pipe means it closed: the
        # process died while idle. Checked before a call is sent (one poll, a
        # few µs), so such a death costs no call. The pipe tells at once; the
        # forkserver reports the exit status a moment later, so is_alive() would
        # still say True here.
        process, conn = self._process, self._conn
        if process is None or conn is None:
            return False
        try:
            idle_and_open = self._wait_reply(conn, process, 0) is _TIMEOUT
        except (OSError, ValueError):
            idle_and_open = False
        if idle_and_open:
            return True
        self._stop_process(graceful=False)  # reaps it (SIGKILL after the grace if it somehow lives on)
        self._crashes += 1
        _, text = _exit_description(process.exitcode)
        logger.warning("%s: process %s died while idle (%s)", self.name, self._pid, text)
        self._restarts_pending_state(ProcessState.CRASHED)
        return False

    def _wait_reply(self, conn: PipePair, process: BaseProcess, timeout: float | None) -> object:
        # What multiprocessing.connection.wait([conn, sentinel, wake]) does, with
        # one poll object kept per process instead of a selector built and torn
        # down per call (about a third of a trivial call's round trip).
        poller = self._poller
        if poller is None:
            if not _HAVE_POLL:
                ready = wait([conn.reader, process.sentinel, self._wake_r], timeout)
                return _REPLY if conn.reader in ready else _WAKE if self._wake_r in ready else \
                    _DIED if process.sentinel in ready else _TIMEOUT
            poller = select.poll()
            for fd in (conn.fileno(), process.sentinel, self._wake_r.fileno()):
                poller.register(fd, select.POLLIN | select.POLLPRI)
            self._poller = poller
            self._poll_fds = (conn.fileno(), self._wake_r.fileno())
        events = poller.poll(None if timeout is None else max(0, math.ceil(timeout * 1000)))
        if not events:
            return _TIMEOUT
        conn_fd, wake_fd = self._poll_fds
        fds = {fd for fd, _ in events}
        return _REPLY if conn_fd in fds else _WAKE if wake_fd in fds else _DIED

    def _check_recycle(self) -> None:
        due: str | None = None
        if self._max_calls is not None and self._calls_since_start >= self._max_calls:
            due = f"max_calls ({self._max_calls})"
        elif self._max_rss is not None and self._ps is not None:
            now = time.monotonic()
            if now - self._last_rss_check >= self._rss_check_interval:
                self._last_rss_check = now
                try:
                    rss = int(self._ps.memory_info().rss)
                except (psutil.Error, OSError):
                    rss = 0
                if rss > self._max_rss:
                    due = f"max_rss ({rss} > {self._max_rss} bytes)"
        if due is not None:
            with self._lock:
                self._recycle_due = due

    def _replace(self, reason: str) -> None:
        recycling = self._recycle_due is not None
        had_process = self._process is not None
        if self._alive:
            self._stop_process(graceful=True)
        with self._lock:
            self._recycle_due = None
        if recycling:
            self._recycles += 1
            logger.info("%s: recycling process %s (%s)", self.name, self._pid, reason)
        if had_process:
            self._restarts += 1
        self._start_locked()

    def _start_locked(self) -> None:
        if not self._alive:
            self._launch()
        if self._startup is None:
            self._await_ready()

    def _launch(self) -> None:
        # Two one-way pipes, not one duplex socket pair: a pipe's write and wake-up cost
        # less than a Unix socket's (~4 µs of a trivial call's round trip, measured here).
        requests_r, requests_w = self._ctx.Pipe(duplex=False)
        replies_r, replies_w = self._ctx.Pipe(duplex=False)
        parent_conn = PipePair(replies_r, requests_w)
        with no_collection():
            # Fresh per process: a process killed while holding the lock must not leave it held for its replacement.
            shared = (self._ctx.RawArray("b", _child.SLOTS), self._ctx.Lock())
            process = self._ctx.Process(target=_child.child_main,
                                        args=(requests_r, self._preload, shared, replies_w), name=self.name)
            started = time.perf_counter()
            try:
                process.start()
            except BaseException:
                for end in (requests_r, requests_w, replies_r, replies_w):
                    end.close()
                raise
        # So that the child's death closes the reply pipe for us (EOF, not a hang).
        requests_r.close()
        replies_w.close()
        self._poller = None  # registered with the previous process's fds
        with self._lock:
            self._shared = shared
            self._process, self._conn, self._alive = process, parent_conn, True
            self._pid = process.pid
            self._state = ProcessState.STARTING
            self._calls_since_start = 0
            self._startup = None
            self._launched_at = started
        with _live_lock:
            _live.add(self)

    def _await_ready(self) -> None:
        process, conn = self._process, self._conn
        assert process is not None and conn is not None
        deadline = time.monotonic() + self._start_timeout
        while True:
            ready = wait([conn.reader, process.sentinel, self._wake_r], max(0.0, deadline - time.monotonic()))
            if conn.reader in ready:
                try:
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    message = None
                if message is not None and message[0] == READY:
                    elapsed = time.perf_counter() - self._launched_at
                    with self._lock:
                        self._startup = elapsed
                        self._state = ProcessState.IDLE
                    try:
                        self._ps = psutil.Process(process.pid)
                    except psutil.Error:
                        self._ps = None
                    logger.debug("%s: process %s ready in %.3f s", self.name, process.pid, elapsed)
                    return
                detail = message[1] if message is not None and message[0] == START_FAILED else ""
                self._stop_process(graceful=False)
                self._restarts_pending_state(ProcessState.CRASHED)
                _, text = _exit_description(process.exitcode)
                raise WorkerStartFailed(f"{self.name}: worker process {process.pid} failed to start ({text})"
                                        + (f":\n{detail}" if detail else ""))
            if self._wake_r in ready:
                self._drain_wake()
                raise self._terminated_now()
            if process.sentinel in ready:
                self._stop_process(graceful=False)
                self._restarts_pending_state(ProcessState.CRASHED)
                _, text = _exit_description(process.exitcode)
                raise WorkerStartFailed(f"{self.name}: worker process {process.pid} exited before it was ready "
                                        f"({text})")
            if time.monotonic() >= deadline:
                self._stop_process(graceful=False)
                self._restarts_pending_state(ProcessState.CRASHED)
                raise WorkerStartFailed(f"{self.name}: worker process {process.pid} was not ready within "
                                        f"start_timeout={self._start_timeout} s")

    def _stop_process(self, *, graceful: bool) -> None:
        # Only the owner of _call_lock (or close()) calls this. Graceful: close the
        # pipe (an idle child exits on EOF); otherwise SIGTERM. Either way SIGKILL
        # after the grace, and the process is reaped under _lock so terminate()
        # never signals a reaped (possibly reused) pid.
        process = self._process
        if process is None:
            return
        if graceful:
            self._close_conn()
        elif self._alive:
            with self._lock:
                self._signal(signal.SIGTERM)
        if wait([process.sentinel], self._grace) == [] and self._alive:
            with self._lock:
                self._signal(signal.SIGKILL)
            wait([process.sentinel], 10.0)
        with self._lock:
            process.join(0)
            if process.exitcode is not None:
                self._alive = False
        self._close_conn()
        with _live_lock:
            _live.discard(self)

    def _signal(self, signum: int) -> None:
        # Caller holds _lock.
        process = self._process
        if process is None or not self._alive or process.exitcode is not None:
            return
        try:
            if signum == signal.SIGTERM:
                process.terminate()
            else:
                process.kill()
        except (ProcessLookupError, OSError, ValueError):
            pass

    def _close_conn(self) -> None:
        self._poller = None  # its fds may be reused once closed
        conn = self._conn
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _drain_wake(self) -> None:
        self._wake_pending = False
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass


def _close_sockets(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()
