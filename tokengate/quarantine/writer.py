"""The quarantine's database writer: one thread, a bounded queue, bounded waits.

The quarantine policy must persist a held call before it tells the caller
"quarantined" (an acknowledged record is never lost), but SQLite I/O can
block for seconds: another process holding the lock, a slow disk. So the
policy never writes on the submitting thread. It hands a
:class:`PendingWrite` to :class:`QuarantineWriter`, whose single thread
pickles the arguments, writes whole batches in one transaction, and reports
each outcome back through a callback. The policy bounds how long a call waits
(``write_timeout``); a write still not done by then is *abandoned*: the call is
admitted and, should its transaction still commit, the record is discarded
with a note instead of being left for someone to release.

Each :class:`PendingWrite` moves through ``WAITING -> COMMITTING -> WRITTEN |
FAILED`` on the writer thread, or ``WAITING -> ABANDONED`` when the policy
gives up on it; every change happens under :attr:`QuarantineWriter.lock`, so
exactly one side decides each call's fate. ``COMMITTING`` is only ever held
for the insert and COMMIT of a transaction whose write lock is already held.

A database that cannot be opened or written is reported through
:class:`Throttled`: the first failure at ERROR, then at most one line per
``log_interval`` saying how many were suppressed -- never a traceback per call.
"""

from __future__ import annotations

import enum
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .record import QuarantineFullError, QuarantineRecord, QuarantineStoreError

if TYPE_CHECKING:
    from .store import QuarantineStore
    from ..token import TaskToken

__all__ = ["PendingWrite", "QuarantineWriter", "Throttled", "WriteState"]

logger = logging.getLogger("tokengate.policies.quarantine")

_BATCH = 64  # entries written per transaction at most
_STOP = object()


class WriteState(enum.Enum):
    """Where one held call's record is (see the module docs)."""

    WAITING = "waiting"
    COMMITTING = "committing"
    WRITTEN = "written"
    FAILED = "failed"
    ABANDONED = "abandoned"


class PendingWrite:
    """One held call on its way to the database; its fields change under the writer's lock."""

    __slots__ = ("operation_type", "func_module", "func_qualname", "trigger", "reason", "args", "kwargs",
                 "state", "held", "orphaned", "record", "error", "done", "token", "timer", "lock", "reported")

    def __init__(self, operation_type: str, func_module: str, func_qualname: str, trigger: str, reason: str,
                 args: tuple[Any, ...], kwargs: dict[str, Any], token: TaskToken[Any] | None) -> None:
        self.operation_type = operation_type
        self.func_module = func_module
        self.func_qualname = func_qualname
        self.trigger = trigger
        self.reason = reason
        self.args: tuple[Any, ...] | None = args
        self.kwargs: dict[str, Any] | None = kwargs
        self.state = WriteState.WAITING
        #: The policy holds the token (admit returned False): it must be released when the write ends.
        self.held = False
        #: The token settled otherwise (killed, stopped) while its record was being committed.
        self.orphaned = False
        self.record: QuarantineRecord | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.token = token
        self.timer: Any = None  # the loop's deadline handle, if any
        #: Guards state/held/orphaned/reported: the writer's lock once submitted.
        self.lock = threading.Lock()
        #: The policy counted (and logged) this call as admitted without a record.
        self.reported = False


class Throttled:
    """Logs one message at most once per *interval* seconds, counting the ones it held back. Thread-safe."""

    def __init__(self, log: logging.Logger, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._suppressed = 0

    def __call__(self, level: int, message: str, *args: object) -> bool:
        """Log it (True) unless one was logged less than *interval* ago (False: counted instead)."""
        now = self._clock()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return False
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        if suppressed:
            message += " (%d more like this in the last %g s)"
            args = (*args, suppressed, self._interval)
        self._log.log(level, message, *args)
        return True

    def reset(self) -> None:
        """Forget the interval: the next message is logged at once (after a recovery)."""
        with self._lock:
            self._next = float("-inf")
            self._suppressed = 0


class QuarantineWriter:
    """The thread that writes held calls' records (see the module docs).

    Args:
        store: An open store to write to, or None to open one with *opener*.
        opener: Opens the database (raises :class:`QuarantineStoreError`); None
            when the store belongs to the caller (it is then never reopened or closed).
        on_done: Called on the writer thread with each entry once it is
            WRITTEN or FAILED (never for an ABANDONED one).
        queue_size: Entries waiting to be written at most; :meth:`submit`
            refuses more (the policy then admits the call).
        retry_interval: Seconds between attempts to open an unopenable database.
        log_interval: Seconds between two logged database failures.
    """

    def __init__(self, store: QuarantineStore | None, opener: Callable[[], QuarantineStore] | None, *,
                 on_done: Callable[[PendingWrite], None], queue_size: int, retry_interval: float,
                 log_interval: float, name: str = "tokengate-quarantine-writer") -> None:
        self.lock = threading.Lock()
        self._store = store
        self._opener = opener
        self._on_done = on_done
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._retry_interval = retry_interval
        self._next_open = 0.0
        self._opened = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.failures = Throttled(logger, log_interval)
        self.written = 0
        self.failed = 0

    @property
    def store(self) -> QuarantineStore | None:
        """The open store, or None while the database cannot be opened."""
        store = self._store
        return None if store is None or store.closed else store

    @property
    def queued(self) -> int:
        """Writes and jobs waiting for the thread."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def start(self, open_wait: float) -> None:
        """Start the thread and wait up to *open_wait* seconds for its first attempt to open the database."""
        self._thread.start()
        self._opened.wait(open_wait)

    def submit(self, entry: PendingWrite) -> bool:
        """Queue *entry*; False (not queued) when stopping, the queue is full, or the database is not open."""
        if self._stopping or self.store is None:
            return False
        entry.lock = self.lock
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            return False
        return True

    def run_job(self, job: Callable[[QuarantineStore | None], None]) -> bool:
        """Queue *job* to run on the writer thread, in order with the writes, with the store (None if not open).

        False (not queued) when stopping or the queue is full; the caller then
        runs it itself. A job's :class:`QuarantineStoreError` is logged (throttled).
        """
        if self._stopping or not self._thread.is_alive():
            return False
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued before this call was written; False at *timeout* (or if stopped)."""
        done = threading.Event()
        if threading.current_thread() is self._thread or self._stopping or not self._thread.is_alive():
            return False  # from a job it would wait for itself
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def stop(self, timeout: float) -> bool:
        """Stop the thread: finish what is queued, fail what cannot finish, close an owned store.

        Queued writes and jobs get *timeout* seconds; then a write still waiting
        for another process's lock is interrupted (and fails). Returns False if
        the thread did not end (it is a daemon, and everything it still holds is
        failed when it does end).
        """
        if not self._thread.is_alive():
            self._stopping = True
            self._close_owned()
            return True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._stopping = True
        if self._thread.is_alive():
            store = self._store
            if store is not None:
                store.interrupt()  # a write waiting for another process's lock gives up now
            self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._ensure_open()
            self._opened.set()
            while not self._stopping:
                try:
                    first = self._queue.get(timeout=None if self.store is not None else self._retry_interval)
                except queue.Empty:
                    self._ensure_open()  # retry a database that could not be opened
                    continue
                if first is _STOP:
                    break
                if not isinstance(first, PendingWrite):
                    self._job(first)
                    continue
                batch = [first]
                job = None
                while len(batch) < _BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        self._stopping = True
                        break
                    if not isinstance(item, PendingWrite):
                        job = item  # jobs keep their place in the queue's order
                        break
                    batch.append(item)
                self._write(batch)
                if job is not None:
                    self._job(job)
        except BaseException:  # noqa: BLE001 - a bug here must not strand held calls
            logger.exception("quarantine writer thread failed; held calls are admitted")
        finally:
            self._opened.set()
            self._stopping = True
            leftover: list[PendingWrite] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, PendingWrite):
                    leftover.append(item)
                elif item is not _STOP:
                    self._job(item)
            if leftover:
                self._finish(leftover, QuarantineStoreError("the quarantine writer stopped"))
            self._close_owned()

    def _job(self, job: Callable[[QuarantineStore | None], None] | threading.Event) -> None:
        if isinstance(job, threading.Event):  # a flush() marker: everything before it is done
            job.set()
            return
        store = self._ensure_open()
        try:
            job(store)
        except QuarantineStoreError as exc:
            self.failures(logging.ERROR, "quarantine database failed updating a record: %s", exc)
        except Exception:
            logger.exception("quarantine: a record update failed")

    def _close_owned(self) -> None:
        if self._opener is not None:
            store, self._store = self._store, None
            if store is not None:
                store.close()

    def _ensure_open(self) -> QuarantineStore | None:
        store = self.store
        if store is not None or self._opener is None or self._stopping:
            return store
        now = time.monotonic()
        if now < self._next_open:
            return None
        try:
            self._store = self._opener()
        except QuarantineStoreError as exc:
            self._next_open = now + self._retry_interval
            self.failures(logging.ERROR, "cannot open the quarantine database (%s); anomalous calls are admitted "
                          "until it opens (retrying every %g s)", exc, self._retry_interval)
            return None
        self.failures.reset()
        return self._store

    def _write(self, batch: list[PendingWrite]) -> None:
        live = [e for e in batch if e.state is WriteState.WAITING]
        if not live:
            return
        store = self._ensure_open()
        if store is None:
            self._finish(live, QuarantineStoreError("the quarantine database is not open"))
            return
        by_id: dict[str, PendingWrite] = {}
        records: list[QuarantineRecord] = []
        for entry in live:
            # Pickling and summaries run user code: here, never on the caller's thread or under a lock.
            record = store.prepare(entry.operation_type, entry.func_module, entry.func_qualname, entry.trigger,
                                   entry.reason, entry.args or (), entry.kwargs or {})
            by_id[record.id] = entry
            records.append(record)

        def select(candidates: list[QuarantineRecord]) -> list[QuarantineRecord]:
            # Runs once the write lock is held: only calls still waiting are written.
            chosen = []
            with self.lock:
                for record in candidates:
                    entry = by_id[record.id]
                    if entry.state is WriteState.WAITING:
                        entry.state = WriteState.COMMITTING
                        chosen.append(record)
            return chosen

        try:
            results = store.insert(records, select=select)
        except QuarantineStoreError as exc:
            self._finish(live, exc)
            self._after_failure(store, exc)
            return
        for record_id, entry in by_id.items():
            result = results.get(record_id)
            if result is None:
                continue  # abandoned before its transaction began: nothing was written
            if isinstance(result, QuarantineFullError):
                self._finish([entry], result)
            else:
                self._finish([entry], None, result)

    def _after_failure(self, store: QuarantineStore, exc: QuarantineStoreError) -> None:
        cause = exc.__cause__
        text = str(cause if cause is not None else exc).lower()
        self.failures(logging.ERROR, "quarantine database %s failed (%s); the calls it was writing are admitted",
                      store.path, cause if cause is not None else exc)
        if (self._opener is not None and isinstance(cause, sqlite3.DatabaseError)
                and ("malformed" in text or "not a database" in text)):
            # A corrupt file: reopen it later (someone may restore it) instead of failing every batch on it.
            self._close_owned()
            self._next_open = time.monotonic() + self._retry_interval

    def _finish(self, entries: list[PendingWrite], error: BaseException | None,
                record: QuarantineRecord | None = None) -> None:
        for entry in entries:
            with self.lock:
                if entry.state not in (WriteState.WAITING, WriteState.COMMITTING):
                    continue  # abandoned meanwhile: the policy already decided
                entry.state = WriteState.FAILED if error is not None else WriteState.WRITTEN
                entry.error, entry.record = error, record
            entry.args = entry.kwargs = None
            if error is None:
                self.written += 1
            else:
                self.failed += 1
            entry.done.set()
            try:
                self._on_done(entry)
            except Exception:
                logger.exception("quarantine: handling the outcome of a record write failed")
