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

Error containment:
    A :class:`sqlite3.Error` inside the store is re-raised as
    :class:`QuarantineStoreError` (a ``RuntimeError``); :meth:`QuarantineStore.add`
    also logs it with ``logger.exception``. The coordinator catches
    ``QuarantineStoreError`` around ``add`` and never crashes because the
    quarantine database is unavailable -- it decides how to treat the call
    (the store itself never decides policy).

Concurrency:
    One connection (``check_same_thread=False``) is shared by all threads and
    guarded by a :class:`threading.Lock`; writes use ``BEGIN IMMEDIATE`` so a
    second process using the same file (an operator CLI) cannot interleave a
    read-then-write transition. File databases use WAL journal mode.
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
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import psutil

from tokengate.errors import ConfigurationError

from .quarantine_record import (
    QuarantineRecord,
    QuarantineStateError,
    QuarantineStatus,
    QuarantineStoreError,
    _clip,
    summarize_args,
)

__all__ = [
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

SCHEMA_VERSION = 2  # 2: claimed_by / claimed_at (release claims across processes)
DEFAULT_PATH = "tokengate-quarantine.sqlite3"
MAX_LIST_LIMIT = 1000
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
_OUTCOME_SUMMARY_LIMIT = 2000

_COLUMNS = (
    "id, operation_type, func_module, func_qualname, trigger, reason, "
    "args_summary, kwargs_summary, payload, payload_error, created_at, "
    "updated_at, status, outcome_summary, outcome_ok, claimed_by, claimed_at"
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
    payload         BLOB,
    payload_error   TEXT,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'released', 'discarded')),
    outcome_summary TEXT,
    outcome_ok      INTEGER,
    claimed_by      TEXT,
    claimed_at      REAL
)
"""

# Columns added after schema version 1, with their declarations (see _init_schema).
_ADDED_COLUMNS = (("claimed_by", "TEXT"), ("claimed_at", "REAL"))

_CREATE_INDEX = """
CREATE INDEX IF NOT EXISTS quarantine_status_op_created
    ON quarantine (status, operation_type, created_at)
"""



def _row_to_record(row: tuple[Any, ...]) -> QuarantineRecord:
    outcome_ok = row[14]
    return QuarantineRecord(
        id=row[0],
        operation_type=row[1],
        func_module=row[2],
        func_qualname=row[3],
        trigger=row[4],
        reason=row[5],
        args_summary=row[6],
        kwargs_summary=row[7],
        payload=bytes(row[8]) if row[8] is not None else None,
        payload_error=row[9],
        created_at=float(row[10]),
        updated_at=float(row[11]),
        status=QuarantineStatus(row[12]),
        outcome_summary=row[13],
        outcome_ok=None if outcome_ok is None else bool(outcome_ok),
        claimed_by=row[15],
        claimed_at=None if row[16] is None else float(row[16]),
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
    :class:`QuarantineStoreError` if the file cannot be created or opened or
    holds a newer schema. Payloads larger than ``max_payload_bytes`` (``None``
    for no limit) are not stored; the record is kept with ``payload_error``
    explaining why. Call :meth:`close` (or use ``with``) when done.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_PATH,
        *,
        max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES,
        timeout: float = 5.0,
    ) -> None:
        if max_payload_bytes is not None and (not _is_int(max_payload_bytes) or max_payload_bytes <= 0):
            raise ConfigurationError(
                f"max_payload_bytes must be a positive int or None, got {max_payload_bytes!r}"
            )
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise ConfigurationError(f"timeout must be a non-negative number, got {timeout!r}")
        self._path = os.fspath(path)
        self._in_memory = self._path == ":memory:"
        self._claimant = f"{process_identity()}/{uuid.uuid4().hex[:12]}"
        self._max_payload_bytes = max_payload_bytes
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
        try:
            self._init_schema(conn)
        except BaseException:
            conn.close()
            self._conn = None
            raise
        _open_claimants.add(self._claimant)

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
                conn.execute(_CREATE_TABLE)
                conn.execute(_CREATE_INDEX)
                # A version-1 table lacks the claim columns; adding them keeps its records.
                present = {str(r[1]) for r in conn.execute("PRAGMA table_info(quarantine)")}
                for column, declaration in _ADDED_COLUMNS:
                    if column not in present:
                        conn.execute(f"ALTER TABLE quarantine ADD COLUMN {column} {declaration}")
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
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc
            try:
                yield conn
            except BaseException as exc:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # the original error is the one worth reporting
                    logger.debug("rollback failed after %s error", action, exc_info=True)
                if isinstance(exc, sqlite3.Error):
                    raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock for an autocommit read; wrap sqlite errors."""
        with self._lock:
            conn = self._require_conn()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise QuarantineStoreError(f"quarantine store: {action} failed: {exc}") from exc

    def _fetch(self, conn: sqlite3.Connection, id: str) -> QuarantineRecord | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM quarantine WHERE id = ?", (id,)).fetchone()
        return _row_to_record(row) if row is not None else None

    def _pickle(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[bytes | None, str | None]:
        try:
            payload = pickle.dumps((tuple(args), dict(kwargs)), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # locks, lambdas, sockets...: keep the record, drop the payload
            return None, f"{type(exc).__name__}: {exc}"
        if self._max_payload_bytes is not None and len(payload) > self._max_payload_bytes:
            return None, (
                f"payload of {len(payload)} bytes exceeds max_payload_bytes "
                f"({self._max_payload_bytes})"
            )
        return payload, None

    # -- public API -------------------------------------------------------

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
        """Persist a held call as a PENDING record and return it.

        ``(args, kwargs)`` are pickled with the highest protocol; if that fails
        (or exceeds ``max_payload_bytes``) the record is still stored, with
        ``payload=None`` and ``payload_error`` set, so the operator can see
        what was held even though it cannot be replayed. A database failure
        is logged and raised as :class:`QuarantineStoreError`.
        """
        # Pickling and summarising run user __reduce__/__repr__ code, so do it
        # before taking the lock.
        payload, payload_error = self._pickle(args, kwargs)
        args_summary, kwargs_summary = summarize_args(args, kwargs)
        now = time.time()
        record = QuarantineRecord(
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
        )
        try:
            with self._write("add") as conn:
                conn.execute(
                    f"INSERT INTO quarantine ({_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.operation_type,
                        record.func_module,
                        record.func_qualname,
                        record.trigger,
                        record.reason,
                        record.args_summary,
                        record.kwargs_summary,
                        record.payload,
                        record.payload_error,
                        record.created_at,
                        record.updated_at,
                        record.status.value,
                        None,
                        None,
                        None,
                        None,
                    ),
                )
        except QuarantineStoreError:
            logger.exception(
                "failed to quarantine call to %s.%s (operation %r)",
                func_module,
                func_qualname,
                operation_type,
            )
            raise
        if payload_error is not None:
            logger.info("quarantined %s without a replayable payload: %s", record.id, payload_error)
        return record

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
        if record is None:
            raise KeyError(f"no quarantined call with id {id!r}")
        if record.payload is None:
            raise ValueError(
                f"quarantined call {id} has no stored payload and cannot be replayed: "
                f"{record.payload_error or 'unknown reason'}"
            )
        try:
            value = pickle.loads(record.payload)
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

    def mark_discarded(self, id: str) -> QuarantineRecord:
        """Mark a PENDING record DISCARDED (it will never run).

        Raises :class:`KeyError` for an unknown ``id`` and
        :class:`QuarantineStateError` if it is not PENDING or another live
        process is releasing it. The payload is kept for audit.
        """
        with self._write("mark discarded") as conn:
            record = self._pending_or_raise(self._fetch(conn, id), id, "discarded")
            owner = self._foreign_claim(record, self._claimant)
            if owner is not None:
                raise QuarantineStateError(
                    f"quarantined call {id} is being released by process {owner}; it cannot be discarded")
            conn.execute(
                "UPDATE quarantine SET status = ?, updated_at = ?, claimed_by = NULL, claimed_at = NULL "
                "WHERE id = ?", (QuarantineStatus.DISCARDED.value, time.time(), id))
            discarded = self._fetch(conn, id)
        assert discarded is not None
        return discarded

    def stats(self) -> dict[str, Any]:
        """Return ``{"path", "total", "by_status": {status: count}}`` (all statuses present)."""
        by_status = {s.value: 0 for s in QuarantineStatus}
        with self._read("stats") as conn:
            rows = conn.execute("SELECT status, COUNT(*) FROM quarantine GROUP BY status").fetchall()
        for status, n in rows:
            by_status[str(status)] = int(n)
        return {"path": self._path, "total": sum(by_status.values()), "by_status": by_status}

    def close(self) -> None:
        """Close the database connection; calling it again does nothing.

        Later calls to other methods raise :class:`QuarantineStoreError`.
        """
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            _open_claimants.discard(self._claimant)
            conn.close()

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
