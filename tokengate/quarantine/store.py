"""Persistent storage for quarantined calls.

A quarantined call is one a policy held for operator review instead of
running it (for example because its arguments were too large, because the
operation is marked as a poison call, or because the operation is on hold).
Each call becomes a :class:`QuarantineRecord` in a SQLite database (stdlib
:mod:`sqlite3`). An operator can later *release* it (re-run it and record the
outcome) or *discard* it; both transitions are only allowed from PENDING.

Release claims:
    Re-running a record takes a while, and several processes may share one
    database (the workers of one web app, an operator CLI). Before a release
    re-runs a call, :meth:`QuarantineStore.claim` marks the record as taken by
    this store (``claimed_by`` = ``"host:pid:start time/store id"``) in one
    IMMEDIATE transaction, so no other process, and no other store of this
    process, can release the same record while the first one runs it. The
    claim ends when the record is marked RELEASED (it then says who released
    it), or with :meth:`QuarantineStore.unclaim` when the call settled
    without running. A claim left by a store that is gone is recognised and
    taken over: closed in this process, or of a process that died on this host
    (that pid no longer runs, or runs a newer process). A claim from another
    host is respected unless the caller forces a take-over.

Trust boundary -- read this before pointing the store at a file:
    The payload column holds a **pickle** of the call's ``(args, kwargs)``.
    Unpickling (:meth:`QuarantineStore.load_payload`) executes code chosen by
    whoever can write the database file. That is why the store creates the
    file with owner-only permissions (``0o600``) and tightens broader
    permissions on an existing file (logging a warning), and why a quarantine
    database must never be loaded from an untrusted source, copied from
    another machine you do not control, or placed in a world-writable
    directory. The human-readable summaries (``args_summary`` and
    ``kwargs_summary``) are safe to display; only the payload is dangerous.

Payloads live in their own table:
    Summaries (:meth:`QuarantineStore.list`, :meth:`~QuarantineStore.get`,
    :meth:`~QuarantineStore.count`, :meth:`~QuarantineStore.stats`) read only the
    ``quarantine`` table, whose rows are small: each payload is in
    ``quarantine_payload`` (read only by :meth:`~QuarantineStore.load_payload`),
    and its size in the ``payload_size`` column. (A large BLOB in the middle of
    a row would be read, page by page, by any query that needs a column after
    it.) Schema version 3 introduced this layout; an older file is migrated in
    place when it is opened, keeping every record and payload.

Retention:
    ``max_records`` caps the records of every status together and
    ``max_total_payload_bytes`` the payload bytes kept; both are enforced in the
    same transaction as each insert, so the file stays bounded whoever writes
    it. What goes first:

    1. payloads of finished (released or discarded) records, oldest first,
       then payloads of pending records, oldest first (never one whose
       release is in flight): the record stays, with ``payload_kept`` false
       and ``payload_error`` saying it was evicted, so it can still be read and
       discarded but not released;
    2. whole finished records, oldest first, when there are more than
       ``max_records``.

    A pending record itself is never evicted: when ``max_records`` records
    are pending, :meth:`~QuarantineStore.add` raises
    :class:`QuarantineFullError` (the quarantine policy then admits the call).
    A payload larger than ``max_payload_bytes`` is never stored (the record is,
    saying so).

Error containment:
    A :class:`sqlite3.Error` inside the store is re-raised as
    :class:`QuarantineStoreError` (a ``RuntimeError``); the store never logs a
    traceback per failure and never decides policy: the quarantine policy
    catches ``QuarantineStoreError`` and admits the call. A write whose COMMIT
    fails is rolled back, so the connection is usable for the next write.

Concurrency:
    Writes use one connection (``check_same_thread=False``) guarded by a
    :class:`threading.Lock`, in ``BEGIN IMMEDIATE`` transactions so a second
    process using the same file (an operator CLI) cannot interleave a
    read-then-write transition. File databases use WAL journal mode and a
    second, read-only connection with its own lock for summaries, so a
    listing never waits for a writer blocked on another process's lock
    (``":memory:"`` stores share one connection).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import pickle
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import psutil

from tokengate.errors import ConfigurationError

from .record import (
    QuarantineFullError,
    QuarantineRecord,
    QuarantineStateError,
    QuarantineStatus,
    QuarantineStoreError,
    _clip,
    summarize_args,
)

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

logger = logging.getLogger(__name__)

# 2: claimed_by / claimed_at (release claims across processes)
# 3: payloads in their own table; payload_size / payload_kept columns (summaries never read payloads)
SCHEMA_VERSION = 3
DEFAULT_PATH = "tokengate-quarantine.sqlite3"
MAX_LIST_LIMIT = 1000
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_RECORDS = 10_000
DEFAULT_MAX_TOTAL_PAYLOAD_BYTES = 256 * 1024 * 1024
_OUTCOME_SUMMARY_LIMIT = 2000
_EVICTED = "payload evicted by the retention policy (max_total_payload_bytes={limit}) after {size} bytes were kept"

# Every column of the summary table, in the order _row_to_record reads them.
_COLUMNS = (
    "id, operation_type, func_module, func_qualname, trigger, reason, "
    "args_summary, kwargs_summary, payload_error, created_at, "
    "updated_at, status, outcome_summary, outcome_ok, claimed_by, claimed_at, "
    "payload_size, payload_kept"
)
# The same columns as a version-2 table holds them (payload inline), for the migration.
_V2_COLUMNS = (
    "id, operation_type, func_module, func_qualname, trigger, reason, "
    "args_summary, kwargs_summary, payload_error, created_at, "
    "updated_at, status, outcome_summary, outcome_ok, claimed_by, claimed_at, "
    "COALESCE(length(payload), 0), payload IS NOT NULL"
)

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS quarantine (
    id              TEXT PRIMARY KEY,
    operation_type  TEXT NOT NULL,
    func_module     TEXT NOT NULL,
    func_qualname   TEXT NOT NULL,
    trigger         TEXT NOT NULL,
    reason          TEXT NOT NULL,
    args_summary    TEXT NOT NULL,
    kwargs_summary  TEXT NOT NULL,
    payload_error   TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'released', 'discarded')),
    outcome_summary TEXT,
    outcome_ok      INTEGER,
    claimed_by      TEXT,
    claimed_at      REAL,
    payload_size    INTEGER NOT NULL DEFAULT 0,
    payload_kept    INTEGER NOT NULL DEFAULT 0
)
"""

_CREATE_PAYLOAD_TABLE = """
CREATE TABLE IF NOT EXISTS quarantine_payload (
    id      TEXT PRIMARY KEY,
    payload BLOB NOT NULL
)
"""

# Columns added to the version-1 table by version 2 (see _init_schema).
_ADDED_COLUMNS = (("claimed_by", "TEXT"), ("claimed_at", "REAL"))

_CREATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS quarantine_status_op_created ON quarantine (status, operation_type, created_at)",
    "CREATE INDEX IF NOT EXISTS quarantine_created ON quarantine (created_at)",  # retention: oldest first
)


def _row_to_record(row: tuple[Any, ...]) -> QuarantineRecord:
    outcome_ok = row[13]
    return QuarantineRecord(
        id=row[0],
        operation_type=row[1],
        func_module=row[2],
        func_qualname=row[3],
        trigger=row[4],
        reason=row[5],
        args_summary=row[6],
        kwargs_summary=row[7],
        payload=None,  # never loaded with a summary
        payload_error=row[8],
        created_at=float(row[9]),
        updated_at=float(row[10]),
        status=QuarantineStatus(row[11]),
        outcome_summary=row[12],
        outcome_ok=None if outcome_ok is None else bool(outcome_ok),
        claimed_by=row[14],
        claimed_at=None if row[15] is None else float(row[15]),
        payload_size=int(row[16] or 0),
        payload_kept=bool(row[17]),
    )


_HOST = socket.gethostname()
_identity: tuple[int, str] | None = None  # (pid, identity): recomputed after a fork
# Claimants of the stores open in this process. A claim made here by a store
# that has since been closed is stale even though the process lives on (two
# coordinators of one process may share a file, each with its own store).
_open_claimants: set[str] = set()


def process_identity() -> str:
    """``"host:pid:start"`` of this process: what a release claim records as its owner.

    The start time (seconds since the epoch, from the OS) tells this process
    apart from a later one that reuses its pid.
    """
    global _identity
    pid = os.getpid()
    if _identity is None or _identity[0] != pid:
        try:
            start = psutil.Process(pid).create_time()
        except psutil.Error:
            start = 0.0
        _identity = (pid, f"{_HOST}:{pid}:{start:.2f}")
    return _identity[1]


def claim_is_live(owner: str) -> bool:
    """Whether the store that made a claim may still be using it (True when it cannot be told).

    A claim is ``"host:pid:start/store"``. Made in this process, it is live
    while that store is open. On this host it is dead once its pid is gone or
    belongs to a process started at another time. A claim from another host,
    or in a format this version does not know, counts as live: only its
    owner (or a forced take-over) may end it.
    """
    process, _, _store = owner.partition("/")
    if process == process_identity():
        return owner in _open_claimants
    try:
        host, pid_text, start_text = process.rsplit(":", 2)
        pid, start = int(pid_text), float(start_text)
    except ValueError:
        return True
    if host != _HOST:
        return True
    try:
        return abs(psutil.Process(pid).create_time() - start) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # access denied, zombie: it exists
        return True


def _coerce_status(status: QuarantineStatus | str | None) -> QuarantineStatus | None:
    if status is None or isinstance(status, QuarantineStatus):
        return status
    valid = ", ".join(s.value for s in QuarantineStatus)
    if isinstance(status, str):
        try:
            return QuarantineStatus(status.strip().lower())
        except ValueError:
            pass
    raise ConfigurationError(f"unknown quarantine status {status!r}; valid values: {valid}")


def _check_operation_type(operation_type: str | None) -> None:
    if operation_type is not None and not isinstance(operation_type, str):
        raise ConfigurationError(
            f"operation_type must be a string or None, got {type(operation_type).__name__}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rollback(conn: sqlite3.Connection, action: str) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:  # the original error is the one worth reporting
        logger.debug("rollback failed after %s error", action, exc_info=True)


def _prepare_file(path: str) -> None:
    """Create ``path`` owner-only (0o600) and tighten broader permissions."""
    # Creating the file ourselves (before sqlite does) is the only way to get
    # the mode right atomically; sqlite would create it 0o644 under a usual umask.
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    if os.name == "nt":
        return  # POSIX permission bits do not describe Windows ACLs.
    # SQLite gives -wal/-shm/-journal files the main file's mode, but files
    # left over from an earlier, looser run must be tightened too.
    for candidate in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            mode = os.stat(candidate).st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & 0o077:
            logger.warning(
                "quarantine database file %s had permissions %o; tightening to 600 "
                "(its payloads are pickles and must only be writable by their owner)",
                candidate,
                mode,
            )
            os.chmod(candidate, 0o600)


class QuarantineStore:
    """SQLite-backed store of quarantined calls; safe to share between threads.

    ``path`` is a database file (created owner-only, ``0o600``; an existing
    file with broader permissions is tightened with a logged warning) or
    ``":memory:"`` for a private in-memory database. Construction raises
    :class:`QuarantineStoreError` if the file cannot be created or opened, is
    not a database, or holds a newer schema; a file of an older schema is
    migrated in place. Call :meth:`close` (or use ``with``) when done.

    Limits (each ``None`` for none; invalid values raise
    :class:`~tokengate.errors.ConfigurationError`): a payload larger than
    ``max_payload_bytes`` is not stored (the record is, with ``payload_error``
    saying why); ``max_records`` and ``max_total_payload_bytes`` are the
    retention caps described in the module docs. ``timeout`` is how long a
    write waits for another connection's lock (SQLite's busy timeout).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
        max_records: int | None = DEFAULT_MAX_RECORDS,
        max_total_payload_bytes: int | None = DEFAULT_MAX_TOTAL_PAYLOAD_BYTES,
        timeout: float = 5.0,
    ) -> None:
        for name, value in (("max_payload_bytes", max_payload_bytes), ("max_records", max_records),
                            ("max_total_payload_bytes", max_total_payload_bytes)):
            if value is not None and (not _is_int(value) or value <= 0):
                raise ConfigurationError(f"{name} must be a positive int or None, got {value!r}")
        if (max_payload_bytes is not None and max_total_payload_bytes is not None
                and max_payload_bytes > max_total_payload_bytes):
            raise ConfigurationError(
                f"max_payload_bytes ({max_payload_bytes}) must not exceed max_total_payload_bytes "
                f"({max_total_payload_bytes}): such a payload could never be kept")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
            raise ConfigurationError(f"timeout must be a finite non-negative number, got {timeout!r}")
        self._path = os.fspath(path)
        self._in_memory = self._path == ":memory:"
        self._claimant = f"{process_identity()}/{uuid.uuid4().hex[:12]}"
        self._max_payload_bytes = max_payload_bytes
        self._max_records = max_records
        self._max_total_payload_bytes = max_total_payload_bytes
        # Guards self._conn: the sqlite3 connection object is not safe for
        # concurrent use, and BEGIN/COMMIT pairs from two threads on one
        # connection would interleave into each other's transactions.
        self._lock = threading.Lock()
        try:
            if not self._in_memory:
                _prepare_file(self._path)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves.
            conn = sqlite3.connect(
                self._path, check_same_thread=False, isolation_level=None, timeout=timeout
            )
        except (OSError, sqlite3.Error) as exc:
            raise QuarantineStoreError(
                f"cannot open quarantine database at {self._path!r}: {exc}"
            ) from exc
        self._conn: sqlite3.Connection | None = conn
        self._rconn: sqlite3.Connection | None = conn
        self._rlock = self._lock
        try:
            self._init_schema(conn)
            if not self._in_memory:
                # Summaries get their own connection: in WAL mode it reads while
                # the writer waits for (or holds) the write lock.
                rconn = sqlite3.connect(
                    self._path, check_same_thread=False, isolation_level=None, timeout=timeout)
                self._rconn, self._rlock = rconn, threading.Lock()
                rconn.execute("PRAGMA query_only = ON")
        except BaseException as exc:
            self._close_connections()
            if isinstance(exc, sqlite3.Error):
                raise QuarantineStoreError(f"cannot open quarantine database at {self._path!r}: {exc}") from exc
            raise
        _open_claimants.add(self._claimant)

    def _close_connections(self) -> None:
        conn, rconn = self._conn, self._rconn
        self._conn = self._rconn = None
        for c in {id(c): c for c in (conn, rconn) if c is not None}.values():
            c.close()

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        try:
            if not self._in_memory:
                # WAL lets readers (an operator UI) proceed while a call is
                # being quarantined; it must be set outside a transaction.
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    logger.warning("quarantine database %s is not in WAL mode (%s)", self._path, mode)
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("PRAGMA user_version").fetchone()
                version = int(row[0]) if row else 0
                if version > SCHEMA_VERSION:
                    raise QuarantineStoreError(
                        f"quarantine database {self._path!r} has schema version {version}, "
                        f"newer than this tokengate supports ({SCHEMA_VERSION})"
                    )
                present = {str(r[1]) for r in conn.execute("PRAGMA table_info(quarantine)")}
                if not present:
                    conn.execute(_CREATE_TABLE)
                else:
                    # A version-1 table lacks the claim columns; adding them keeps its records.
                    for column, declaration in _ADDED_COLUMNS:
                        if column not in present:
                            conn.execute(f"ALTER TABLE quarantine ADD COLUMN {column} {declaration}")
                    if "payload" in present:
                        self._move_payloads_out(conn)
                conn.execute(_CREATE_PAYLOAD_TABLE)
                for statement in _CREATE_INDEXES:
                    conn.execute(statement)
                if version < SCHEMA_VERSION:
                    # PRAGMA cannot take bound parameters; the value is our constant.
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise QuarantineStoreError(
                f"cannot initialise quarantine database at {self._path!r}: {exc}"
            ) from exc

    def _move_payloads_out(self, conn: sqlite3.Connection) -> None:
        """Version 2 -> 3, inside _init_schema's transaction: payloads to their own table, sizes to a column.

        The summary table is rebuilt without the payload column (SQLite keeps
        a dropped column's bytes in each row until it is rebuilt anyway). The
        file does not shrink: freed pages are reused by later records
        (``VACUUM`` it offline to give them back to the file system).
        """
        started = time.monotonic()
        conn.execute(_CREATE_PAYLOAD_TABLE)
        conn.execute("INSERT OR REPLACE INTO quarantine_payload (id, payload) "
                     "SELECT id, payload FROM quarantine WHERE payload IS NOT NULL")
        conn.execute("DROP TABLE IF EXISTS quarantine_v3")
        conn.execute(_CREATE_TABLE.replace("quarantine (", "quarantine_v3 (", 1))
        conn.execute(f"INSERT INTO quarantine_v3 ({_COLUMNS}) SELECT {_V2_COLUMNS} FROM quarantine ORDER BY rowid")
        conn.execute("DROP TABLE quarantine")  # its indexes go with it
        conn.execute("ALTER TABLE quarantine_v3 RENAME TO quarantine")
        moved = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
        logger.warning("quarantine database %s migrated to schema version %d (%s records, payloads moved "
                       "to their own table) in %.2f s", self._path, SCHEMA_VERSION, moved[0] if moved else 0,
                       time.monotonic() - started)

    # -- plumbing ---------------------------------------------------------

    @property
    def path(self) -> str:
        """The database path as given (``":memory:"`` for in-memory stores)."""
        return self._path

    @property
    def claimant(self) -> str:
        """What this store writes as ``claimed_by``: ``"host:pid:start/<store id>"``."""
        return self._claimant

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._conn is None

    def _require_conn(self) -> sqlite3.Connection:
        # Caller must hold self._lock.
        if self._conn is None:
            raise QuarantineStoreError("quarantine store is closed")
        return self._conn

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run one IMMEDIATE transaction; wrap sqlite errors."""
        with self._lock:
            conn = self._require_conn()
            if conn.in_transaction:  # never expected: every path below ends its transaction
                logger.warning("quarantine store: a transaction was left open before %s; rolling it back", action)
                _rollback(conn, action)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc
            try:
                yield conn
            except BaseException as exc:
                _rollback(conn, action)
                if isinstance(exc, sqlite3.Error):
                    raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc
                raise
            try:
                conn.execute("COMMIT")
            except BaseException as exc:
                # A failed COMMIT can leave the transaction open (SQLITE_BUSY, a
                # deferred constraint, an interrupt): without a rollback every
                # later BEGIN on this connection would fail ("cannot start a
                # transaction within a transaction") and the write's changes
                # could be committed later by someone else's COMMIT.
                if conn.in_transaction:
                    _rollback(conn, action)
                if isinstance(exc, sqlite3.Error):
                    raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc
                raise

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the read lock for an autocommit read on the read connection; wrap sqlite errors."""
        with self._rlock:
            conn = self._rconn
            if conn is None:
                raise QuarantineStoreError(f"quarantine store {self._path!r} is closed")
            try:
                yield conn
            except sqlite3.Error as exc:
                raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc

    def _fetch(self, conn: sqlite3.Connection, id: str) -> QuarantineRecord | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM quarantine WHERE id = ?", (id,)).fetchone()
        return _row_to_record(row) if row is not None else None

    def _pickle(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[bytes | None, int, str | None]:
        """``(payload or None, its size, why it is not kept or None)``."""
        try:
            payload = pickle.dumps((tuple(args), dict(kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # locks, lambdas, sockets...: keep the record, drop the payload
            return None, 0, f"{type(exc).__name__}: {exc}"
        if self._max_payload_bytes is not None and len(payload) > self._max_payload_bytes:
            return None, len(payload), (
                f"payload of {len(payload)} bytes exceeds max_payload_bytes "
                f"({self._max_payload_bytes})"
            )
        return payload, len(payload), None

    # -- public API -------------------------------------------------------

    def prepare(
        self,
        operation_type: str,
        func_module: str,
        func_qualname: str,
        trigger: str,
        reason: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> QuarantineRecord:
        """Build the PENDING record of a held call, without touching the database.

        Pickles ``(args, kwargs)`` and summarises them (user ``__reduce__`` and
        ``__repr__`` code runs here, never under a lock). A payload that cannot
        be pickled or exceeds ``max_payload_bytes`` is left out and
        ``payload_error`` says why. Store the result with :meth:`insert`.
        """
        payload, payload_size, payload_error = self._pickle(args, kwargs)
        args_summary, kwargs_summary = summarize_args(args, kwargs)
        now = time.time()
        return QuarantineRecord(
            id=uuid.uuid4().hex,
            operation_type=operation_type,
            func_module=func_module,
            func_qualname=func_qualname,
            trigger=trigger,
            reason=reason,
            args_summary=args_summary,
            kwargs_summary=kwargs_summary,
            payload=payload,
            payload_error=payload_error,
            created_at=now,
            updated_at=now,
            status=QuarantineStatus.PENDING,
            outcome_summary=None,
            outcome_ok=None,
            payload_size=payload_size,
            payload_kept=False,
        )

    def insert(
        self,
        records: Sequence[QuarantineRecord],
        *,
        select: Callable[[builtins.list[QuarantineRecord]], builtins.list[QuarantineRecord]] | None = None,
    ) -> dict[str, QuarantineRecord | QuarantineFullError]:
        """Store records made by :meth:`prepare` in one transaction, then apply the retention caps.

        ``select``, if given, is called once the write lock is held (after any
        wait for another process) with the records and returns those still
        wanted; only they are written. Returns, per written record id, the
        stored record (its ``payload`` bytes are not loaded back) or a
        :class:`QuarantineFullError` when ``max_records`` records were
        already pending. Raises :class:`QuarantineStoreError` when the
        database fails; nothing of the batch is then stored.
        """
        results: dict[str, QuarantineRecord | QuarantineFullError] = {}
        with self._write("add") as conn:
            chosen = builtins.list(records) if select is None else select(builtins.list(records))
            if not chosen:
                return results
            room = len(chosen)
            if self._max_records is not None:
                row = conn.execute("SELECT COUNT(*) FROM quarantine WHERE status = ?",
                                   (QuarantineStatus.PENDING.value,)).fetchone()
                room = self._max_records - (int(row[0]) if row else 0)
            for record in chosen:
                if room <= 0:
                    results[record.id] = QuarantineFullError(
                        f"quarantine store {self._path!r} already holds max_records={self._max_records} "
                        "pending records; pending records are never evicted, so this call is not stored")
                    continue
                room -= 1
                kept = record.payload is not None
                conn.execute(
                    f"INSERT INTO quarantine ({_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.id, record.operation_type, record.func_module, record.func_qualname,
                     record.trigger, record.reason, record.args_summary, record.kwargs_summary,
                     record.payload_error, record.created_at, record.updated_at, record.status.value,
                     None, None, None, None, record.payload_size, int(kept)),
                )
                if kept:
                    conn.execute("INSERT INTO quarantine_payload (id, payload) VALUES (?, ?)",
                                 (record.id, record.payload))
            self._enforce_retention(conn)
            for record in chosen:
                if record.id not in results:
                    stored = self._fetch(conn, record.id)
                    assert stored is not None  # inserted in this transaction
                    results[record.id] = stored
        return results

    def _enforce_retention(self, conn: sqlite3.Connection) -> None:
        """Apply max_records and max_total_payload_bytes (see the module docs). Inside a write."""
        deleted = evicted = 0
        if self._max_records is not None:
            row = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()
            excess = (int(row[0]) if row else 0) - self._max_records
            if excess > 0:
                ids = [(r[0],) for r in conn.execute(
                    "SELECT id FROM quarantine WHERE status != ? ORDER BY created_at, rowid LIMIT ?",
                    (QuarantineStatus.PENDING.value, excess)).fetchall()]
                conn.executemany("DELETE FROM quarantine_payload WHERE id = ?", ids)
                conn.executemany("DELETE FROM quarantine WHERE id = ?", ids)
                deleted = len(ids)
        limit = self._max_total_payload_bytes
        if limit is not None:
            row = conn.execute("SELECT COALESCE(SUM(payload_size), 0) FROM quarantine WHERE payload_kept = 1").fetchone()
            kept = int(row[0]) if row else 0
            if kept > limit:
                over = kept - limit
                victims: builtins.list[tuple[str, float, str]] = []
                now = time.time()
                note = _EVICTED.format(limit=limit, size=kept)
                # Finished records first, then pending ones; oldest first; never a release in flight.
                for rid, size in conn.execute(
                        "SELECT id, payload_size FROM quarantine WHERE payload_kept = 1 "
                        "AND (status != ? OR claimed_by IS NULL) "
                        "ORDER BY status = ?, created_at, rowid",
                        (QuarantineStatus.PENDING.value, QuarantineStatus.PENDING.value)).fetchall():
                    victims.append((note, now, rid))
                    over -= int(size)
                    if over <= 0:
                        break
                conn.executemany("DELETE FROM quarantine_payload WHERE id = ?", [(v[2],) for v in victims])
                conn.executemany("UPDATE quarantine SET payload_kept = 0, payload_error = ?, updated_at = ? "
                                 "WHERE id = ?", victims)
                evicted = len(victims)
        if deleted or evicted:
            logger.info("quarantine store %s: retention deleted %d finished records and evicted %d payloads",
                        self._path, deleted, evicted)

    def add(
        self,
        operation_type: str,
        func_module: str,
        func_qualname: str,
        trigger: str,
        reason: str,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> QuarantineRecord:
        """Persist a held call as a PENDING record and return it (:meth:`prepare` then :meth:`insert`).

        ``(args, kwargs)`` are pickled with the highest protocol; if that fails
        (or exceeds ``max_payload_bytes``) the record is still stored, with
        ``payload_error`` set and ``payload_kept`` false, so the operator can
        see what was held even though it cannot be replayed. The returned
        record carries the pickled bytes it stored in ``payload``.

        Raises:
            QuarantineFullError: ``max_records`` records are pending.
            QuarantineStoreError: the database failed (nothing was stored).
        """
        record = self.prepare(operation_type, func_module, func_qualname, trigger, reason, args, kwargs)
        result = self.insert([record])[record.id]
        if isinstance(result, QuarantineFullError):
            raise result
        if record.payload_error is not None:
            logger.info("quarantined %s without a replayable payload: %s", record.id, record.payload_error)
        return replace(result, payload=record.payload if result.payload_kept else None)

    def get(self, id: str) -> QuarantineRecord | None:
        """Return the record with ``id``, or ``None`` if there is none."""
        with self._read("get") as conn:
            return self._fetch(conn, id)

    def list(
        self,
        status: QuarantineStatus | str | None = None,
        operation_type: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> builtins.list[QuarantineRecord]:
        """Return records newest first, optionally filtered, one page at a time.

        ``limit`` must be 1..1000 and ``offset`` >= 0; ``status`` is a
        :class:`QuarantineStatus` or its string value. Invalid arguments raise
        :class:`~tokengate.errors.ConfigurationError` naming the valid values.
        Records with equal timestamps keep insertion order (newest first).
        """
        wanted = _coerce_status(status)
        _check_operation_type(operation_type)
        if not _is_int(limit) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ConfigurationError(f"limit must be an int in 1..{MAX_LIST_LIMIT}, got {limit!r}")
        if not _is_int(offset) or offset < 0:
            raise ConfigurationError(f"offset must be an int >= 0, got {offset!r}")
        where, params = self._where(wanted, operation_type)
        sql = (
            f"SELECT {_COLUMNS} FROM quarantine{where} "
            # rowid breaks ties between records created in the same clock tick.
            "ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?"
        )
        with self._read("list") as conn:
            rows = conn.execute(sql, (*params, limit, offset)).fetchall()
        return [_row_to_record(row) for row in rows]

    @staticmethod
    def _where(
        status: QuarantineStatus | None, operation_type: str | None
    ) -> tuple[str, builtins.list[str]]:
        clauses: builtins.list[str] = []
        params: builtins.list[str] = []
        if status is not None:
            clauses.append("status = ?")
            params.append(status.value)
        if operation_type is not None:
            clauses.append("operation_type = ?")
            params.append(operation_type)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def count(
        self, status: QuarantineStatus | str | None = None, operation_type: str | None = None
    ) -> int:
        """Return how many records match the filters (same rules as :meth:`list`)."""
        wanted = _coerce_status(status)
        _check_operation_type(operation_type)
        where, params = self._where(wanted, operation_type)
        with self._read("count") as conn:
            row = conn.execute(f"SELECT COUNT(*) FROM quarantine{where}", params).fetchone()
        return int(row[0]) if row else 0

    def load_payload(self, id: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Unpickle and return the held call's ``(args, kwargs)``.

        This executes pickle opcodes from the database: see the module's trust
        boundary. Raises :class:`KeyError` for an unknown ``id`` and
        :class:`ValueError` when the record has no payload (``payload_error``
        says why) or the payload cannot be unpickled into ``(tuple, dict)``.
        """
        with self._read("load_payload") as conn:
            record = self._fetch(conn, id)
            row = conn.execute("SELECT payload FROM quarantine_payload WHERE id = ?", (id,)).fetchone()
        if record is None:
            raise KeyError(f"no quarantined call with id {id!r}")
        if row is None or not record.payload_kept:
            raise ValueError(
                f"quarantined call {id} has no stored payload and cannot be replayed: "
                f"{record.payload_error or 'unknown reason'}"
            )
        try:
            value = pickle.loads(bytes(row[0]))
        except Exception as exc:  # classes renamed/removed since the call was held
            raise ValueError(f"cannot unpickle payload of quarantined call {id}: {exc}") from exc
        if (
            not isinstance(value, tuple)
            or len(value) != 2
            or not isinstance(value[0], tuple)
            or not isinstance(value[1], dict)
        ):
            raise ValueError(f"payload of quarantined call {id} is not an (args, kwargs) pair")
        return value[0], value[1]

    @staticmethod
    def _pending_or_raise(record: QuarantineRecord | None, id: str, action: str) -> QuarantineRecord:
        if record is None:
            raise KeyError(f"no quarantined call with id {id!r}")
        if record.status is not QuarantineStatus.PENDING:
            raise QuarantineStateError(
                f"quarantined call {id} is {record.status.value}, not pending; it cannot be {action}")
        return record

    @staticmethod
    def _foreign_claim(record: QuarantineRecord, me: str) -> str | None:
        """The owner of a live claim on *record* by another store, else None."""
        owner = record.claimed_by
        if owner is None or owner == me or not claim_is_live(owner):
            return None
        return owner

    def claim(self, id: str, *, take_over: bool = False) -> QuarantineRecord:
        """Mark a PENDING record as being released by this process and return it.

        Succeeds when the record is unclaimed, claimed by this store (the
        quarantine policy refuses a second release of its own), or claimed by
        a store that is gone: closed in this process, or of a process no longer
        running on this host. A live claim by another store (another process,
        or another coordinator's store in this one) raises
        :class:`QuarantineStateError` unless ``take_over=True`` (for a claim
        left by a crashed process on another host; the take-over is logged).

        Raises:
            KeyError: no record has this id.
            QuarantineStateError: the record is not pending, or another process holds it.
            QuarantineStoreError: the database failed.
        """
        me = self._claimant
        with self._write("claim") as conn:
            record = self._pending_or_raise(self._fetch(conn, id), id, "released")
            owner = self._foreign_claim(record, me)
            if owner is not None and not take_over:
                since = "an unknown time" if record.claimed_at is None else time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.claimed_at))
                raise QuarantineStateError(
                    f"quarantined call {id} is being released by process {owner} (claimed at {since}); "
                    f"wait for it, or force a take-over if that process is gone")
            now = time.time()
            conn.execute("UPDATE quarantine SET claimed_by = ?, claimed_at = ?, updated_at = ? WHERE id = ?",
                         (me, now, now, id))
            claimed = self._fetch(conn, id)
        if owner is not None:
            logger.warning("quarantined call %s: took over the release claim of process %s", id, owner)
        elif record.claimed_by not in (None, me):
            logger.info("quarantined call %s: took over the stale release claim of %s", id, record.claimed_by)
        assert claimed is not None
        return claimed

    def unclaim(self, id: str) -> bool:
        """End this store's claim on a PENDING record (its release did not run); True if it held one."""
        with self._write("unclaim") as conn:
            cur = conn.execute(
                "UPDATE quarantine SET claimed_by = NULL, claimed_at = NULL, updated_at = ? "
                "WHERE id = ? AND status = ? AND claimed_by = ?",
                (time.time(), id, QuarantineStatus.PENDING.value, self._claimant))
            return cur.rowcount == 1

    def mark_released(self, id: str, outcome_ok: bool, outcome_summary: str) -> QuarantineRecord:
        """Mark a PENDING record RELEASED with the outcome of re-running it.

        ``outcome_summary`` (a short description of the result or error) is
        capped at 2000 characters. The record keeps ``claimed_by``: this
        store's process, which re-ran it. Raises :class:`KeyError` for an unknown
        ``id`` and :class:`QuarantineStateError` if it is not PENDING or
        another live process claimed it.
        """
        summary = _clip(str(outcome_summary), _OUTCOME_SUMMARY_LIMIT)
        me = self._claimant
        with self._write("mark released") as conn:
            record = self._pending_or_raise(self._fetch(conn, id), id, "marked released")
            owner = self._foreign_claim(record, me)
            if owner is not None:
                raise QuarantineStateError(
                    f"quarantined call {id} is claimed by process {owner}; it cannot be marked released here")
            now = time.time()
            conn.execute(
                "UPDATE quarantine SET status = ?, outcome_ok = ?, outcome_summary = ?, updated_at = ?, "
                "claimed_by = ?, claimed_at = COALESCE(claimed_at, ?) WHERE id = ?",
                (QuarantineStatus.RELEASED.value, int(bool(outcome_ok)), summary, now, me, now, id))
            released = self._fetch(conn, id)
        assert released is not None
        return released

    def mark_discarded(self, id: str, note: str | None = None) -> QuarantineRecord:
        """Mark a PENDING record DISCARDED (it will never run); *note* becomes its ``outcome_summary``.

        Raises :class:`KeyError` for an unknown ``id`` and
        :class:`QuarantineStateError` if it is not PENDING or another live
        process is releasing it. The payload is kept for audit (the retention
        policy evicts finished records' payloads first).
        """
        with self._write("mark discarded") as conn:
            record = self._pending_or_raise(self._fetch(conn, id), id, "discarded")
            owner = self._foreign_claim(record, self._claimant)
            if owner is not None:
                raise QuarantineStateError(
                    f"quarantined call {id} is being released by process {owner}; it cannot be discarded")
            conn.execute(
                "UPDATE quarantine SET status = ?, updated_at = ?, claimed_by = NULL, claimed_at = NULL, "
                "outcome_summary = ? WHERE id = ?",
                (QuarantineStatus.DISCARDED.value, time.time(),
                 None if note is None else _clip(str(note), _OUTCOME_SUMMARY_LIMIT), id))
            discarded = self._fetch(conn, id)
        assert discarded is not None
        return discarded

    def stats(self) -> dict[str, Any]:
        """Return ``{"path", "total", "by_status", "payload_bytes", "payloads_kept", "limits"}``.

        ``by_status`` has every status; ``payload_bytes`` is the total size of
        the payloads kept (what ``max_total_payload_bytes`` caps).
        """
        by_status = {s.value: 0 for s in QuarantineStatus}
        with self._read("stats") as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM quarantine GROUP BY status").fetchall()
            kept = conn.execute("SELECT COUNT(*), COALESCE(SUM(payload_size), 0) FROM quarantine "
                                "WHERE payload_kept = 1").fetchone()
        for status, n in rows:
            by_status[str(status)] = int(n)
        return {
            "path": self._path,
            "total": sum(by_status.values()),
            "by_status": by_status,
            "payloads_kept": int(kept[0]) if kept else 0,
            "payload_bytes": int(kept[1]) if kept else 0,
            "limits": self.limits,
        }

    @property
    def limits(self) -> dict[str, int | None]:
        """The size limits this store enforces (``None``: no limit)."""
        return {
            "max_records": self._max_records,
            "max_total_payload_bytes": self._max_total_payload_bytes,
            "max_payload_bytes": self._max_payload_bytes,
        }

    def interrupt(self) -> None:
        """Abort the write in progress, if any (e.g. one waiting for another process's lock). Thread: any.

        The interrupted write fails with :class:`QuarantineStoreError` and is
        rolled back. Used to stop a writer thread promptly.
        """
        conn = self._conn
        if conn is not None:
            try:
                conn.interrupt()
            except sqlite3.Error:  # closed meanwhile
                pass

    def close(self) -> None:
        """Close the database connections; calling it again does nothing.

        Later calls to other methods raise :class:`QuarantineStoreError`.
        """
        with self._lock, self._rlock if self._rlock is not self._lock else contextlib.nullcontext():
            if self._conn is None:
                return
            self._close_connections()
        _open_claimants.discard(self._claimant)

    def __enter__(self) -> QuarantineStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<QuarantineStore {self._path!r} {state}>"
