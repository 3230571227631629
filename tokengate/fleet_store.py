"""The fleet's shared state: one SQLite file (WAL mode) under the fleet directory.

Every server process of one app (``uvicorn --workers N``, gunicorn, several
containers sharing a volume on one host) that is given the same fleet
directory opens the same file, ``<fleet_dir>/fleet.sqlite3``. It holds:

* ``members``: one row per process (per coordinator): id, coordinator name,
  pid, host, process start time, version, heartbeat time, state (``live``,
  ``left``, ``gone``), its latest published snapshot (JSON) and the monotonic
  counters of that snapshot;
* ``commands``: control commands (pause, drain, hold an operation...), each
  with a sequence number, for every member or for one;
* ``acks``: which member applied which command, with its result or why not;
* ``desired``: the fleet's standing state (paused, draining, paused and held
  operations), which a member applies when it joins, so a process started
  while the fleet is paused starts paused;
* ``retired``: the counters of members that left or died, so fleet-wide
  counters never go backwards when a process goes away.

:class:`FleetStore` is a plain synchronous object confined to one thread
(the :class:`~tokengate.fleet.Fleet` thread): it is never used on an event
loop. Every write is one short ``BEGIN IMMEDIATE`` transaction; readers see a
consistent snapshot (WAL). Several processes may write at once: SQLite's
file lock serialises them, and ``busy_timeout`` bounds how long one waits.
The file is created owner-only (``0o600``), like the quarantine's.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

__all__ = ["FILE_NAME", "Ack", "Command", "DesiredState", "FleetStore", "FleetStoreError", "MemberInfo",
           "ACTIONS"]

logger = logging.getLogger("tokengate.fleet")

FILE_NAME = "fleet.sqlite3"
SCHEMA_VERSION = 1
#: Every command a member knows how to apply (see tokengate.fleet.Fleet for what each does).
ACTIONS = frozenset({"pause", "resume", "drain", "pause_operation", "resume_operation", "hold", "unhold",
                     "unblock", "kill_operation", "kill_token", "get_token"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    member_id TEXT PRIMARY KEY,
    fleet TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    process_started_at REAL NOT NULL,
    version TEXT NOT NULL,
    joined_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    state TEXT NOT NULL,
    departed_at REAL,
    reason TEXT,
    snapshot TEXT,
    snapshot_at REAL,
    counters TEXT NOT NULL DEFAULT '{}',
    folded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS members_by_fleet ON members (fleet, state);
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    fleet TEXT NOT NULL,
    issued_at REAL NOT NULL,
    issuer TEXT NOT NULL,
    target TEXT,
    action TEXT NOT NULL,
    operation TEXT,
    args TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS commands_by_fleet ON commands (fleet, seq);
CREATE TABLE IF NOT EXISTS acks (
    seq INTEGER NOT NULL,
    member_id TEXT NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL,
    result TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (seq, member_id)
);
CREATE TABLE IF NOT EXISTS desired (
    fleet TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0,
    draining INTEGER NOT NULL DEFAULT 0,
    paused_operations TEXT NOT NULL DEFAULT '[]',
    held_operations TEXT NOT NULL DEFAULT '[]',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS retired (
    fleet TEXT NOT NULL,
    key TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (fleet, key)
);
"""


class FleetStoreError(RuntimeError):
    """The fleet file could not be opened, read or written (the cause is chained)."""


@dataclass(frozen=True)
class MemberInfo:
    """One member's row (without its snapshot). Times are seconds since the epoch."""

    member_id: str
    fleet: str
    pid: int
    host: str
    process_started_at: float
    version: str
    joined_at: float
    heartbeat_at: float
    state: str
    departed_at: float | None = None
    reason: str | None = None
    snapshot_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Command:
    """One control command: *target* None means every live member but the issuer."""

    seq: int
    issued_at: float
    issuer: str
    target: str | None
    action: str
    operation: str | None
    args: dict[str, Any]


@dataclass(frozen=True)
class Ack:
    """What one member said about one command."""

    member_id: str
    ok: bool
    detail: str
    result: Any
    at: float


@dataclass(frozen=True)
class DesiredState:
    """The fleet's standing control state, applied by a member when it joins."""

    paused: bool = False
    draining: bool = False
    paused_operations: tuple[str, ...] = ()
    held_operations: tuple[str, ...] = ()
    updated_at: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"paused": self.paused, "draining": self.draining,
                "paused_operations": list(self.paused_operations),
                "held_operations": list(self.held_operations), "updated_at": self.updated_at}


def _prepare_dir(directory: Path) -> Path:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise FleetStoreError(f"cannot create the fleet directory {directory}: {exc}") from exc
    if not directory.is_dir():
        raise FleetStoreError(f"the fleet directory {directory} is not a directory")
    path = directory / FILE_NAME
    try:
        # Created by us, owner-only: sqlite would create it 0o644 under a usual umask.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    except OSError as exc:
        raise FleetStoreError(f"cannot create the fleet file {path}: {exc}") from exc
    return path


def check_fleet_dir(value: object) -> Path:
    """*value* as a fleet directory path (not created yet).

    Raises:
        ConfigurationError: for anything but a non-empty str or path.
    """
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise ConfigurationError(f"fleet_dir must be a directory path (str or os.PathLike), got {value!r}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip() or "\x00" in text:
        raise ConfigurationError(f"fleet_dir must be a non-empty directory path, got {value!r}")
    return Path(text).expanduser().absolute()


class FleetStore:
    """The fleet file of one directory; one connection, used by one thread only.

    Args:
        directory: The fleet directory (created ``0o700`` if missing).
        clock: Wall-clock seconds (``time.time``); tests pass a fake one.
        busy_timeout: Seconds a write waits for another process's lock before
            failing with :class:`FleetStoreError`.

    Raises:
        FleetStoreError: the directory or the file cannot be created or opened,
            or the file is not a fleet database.
    """

    def __init__(self, directory: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
                 busy_timeout: float = 2.0) -> None:
        self.path = _prepare_dir(check_fleet_dir(directory))
        self.clock = clock
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=busy_timeout,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise FleetStoreError(f"cannot open the fleet file {self.path}: {exc}") from exc
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("fleet file %s is not in WAL mode (%s): readers will wait for writers", self.path, mode)
            self._conn.execute("PRAGMA synchronous=NORMAL")  # a lost heartbeat is harmless; WAL keeps it consistent
            self._write(lambda c: c.executescript(_SCHEMA) and None, script=True)
            self._write(lambda c: c.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)))
        except (sqlite3.Error, FleetStoreError) as exc:
            self._conn.close()
            raise FleetStoreError(f"cannot use {self.path} as a fleet file: {exc}") from exc

    def close(self) -> None:
        """Close the connection (idempotent)."""
        try:
            self._conn.close()
        except sqlite3.Error:  # pragma: no cover - closing a broken connection
            logger.debug("closing the fleet file failed", exc_info=True)

    # -- transactions ------------------------------------------------------------

    def _write(self, body: Callable[[sqlite3.Connection], Any], *, script: bool = False) -> Any:
        """Run *body* in one ``BEGIN IMMEDIATE`` transaction; roll back on any error."""
        conn = self._conn
        try:
            if script:  # executescript commits by itself
                return body(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            raise FleetStoreError(f"fleet file {self.path}: {exc}") from exc

    def _read(self, body: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run *body* in one read transaction (a consistent snapshot under WAL)."""
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                return body(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise FleetStoreError(f"fleet file {self.path}: {exc}") from exc

    # -- membership --------------------------------------------------------------

    def register(self, fleet: str, *, pid: int, host: str, process_started_at: float, version: str,
                 member_id: str | None = None) -> str:
        """Add a live member to *fleet* and return its id (6 hex digits, unique in the file).

        With *member_id* (a member coming back after being marked gone and
        cleaned up), that id is registered again. A member that finds no
        other live member starts a new fleet: the standing state of the last
        one (a drain before a deploy, say) is cleared, so a restarted server
        does not come up drained; a member joining live ones inherits it.
        """
        now = self.clock()

        def insert(conn: sqlite3.Connection) -> str:
            for _ in range(64):
                candidate = member_id or secrets.token_hex(3)
                taken = conn.execute("SELECT 1 FROM members WHERE member_id = ?", (candidate,)).fetchone()
                if taken is None:
                    alone = conn.execute("SELECT COUNT(*) FROM members WHERE fleet = ? AND state = 'live'",
                                         (fleet,)).fetchone()[0] == 0
                    if alone and conn.execute("DELETE FROM desired WHERE fleet = ?", (fleet,)).rowcount:
                        logger.warning("fleet %s: first live member; the standing state of the previous run "
                                       "(pause, drain, held operations) is cleared", fleet)
                    conn.execute(
                        "INSERT INTO members (member_id, fleet, pid, host, process_started_at, version, joined_at, "
                        "heartbeat_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'live')",
                        (candidate, fleet, pid, host, process_started_at, version, now, now))
                    return candidate
                if member_id is not None:
                    raise FleetStoreError(f"member id {member_id!r} is already registered")
            raise FleetStoreError("could not draw a free member id in 64 tries")  # pragma: no cover

        result: str = self._write(insert)
        return result

    def heartbeat(self, member_id: str, *, snapshot: str | None = None,
                  counters: Mapping[str, float] | None = None) -> bool:
        """Record that *member_id* is alive (and its new snapshot, if given).

        A member that others marked ``gone`` (it was suspended, or its disk
        stalled) becomes ``live`` again, and the counters folded into the
        retired totals for it are taken back out, so nothing counts twice.
        Returns False when the row no longer exists (it was cleaned up): the
        caller registers again.
        """
        now = self.clock()

        def beat(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT fleet, state, folded, counters FROM members WHERE member_id = ?",
                               (member_id,)).fetchone()
            if row is None:
                return False
            fleet, state, folded, old_counters = row
            if state == "left":
                return True  # a leaving member's last beats change nothing
            if folded:
                _add_retired(conn, fleet, json.loads(old_counters), sign=-1.0)
            if snapshot is None:
                conn.execute("UPDATE members SET heartbeat_at = ?, state = 'live', folded = 0, departed_at = NULL, "
                             "reason = NULL WHERE member_id = ?", (now, member_id))
            else:
                conn.execute("UPDATE members SET heartbeat_at = ?, state = 'live', folded = 0, departed_at = NULL, "
                             "reason = NULL, snapshot = ?, snapshot_at = ?, counters = ? WHERE member_id = ?",
                             (now, snapshot, now, json.dumps(dict(counters or {})), member_id))
            if state == "gone":
                logger.warning("fleet member %s is back after being marked gone", member_id)
            return True

        result: bool = self._write(beat)
        return result

    def leave(self, member_id: str, *, counters: Mapping[str, float] | None = None, reason: str = "stopped") -> None:
        """Mark *member_id* as ``left``: its final counters join the retired totals, its snapshot is dropped."""
        now = self.clock()

        def depart(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT fleet, state, folded, counters FROM members WHERE member_id = ?",
                               (member_id,)).fetchone()
            if row is None or row[1] == "left":
                return
            fleet, _state, folded, old = row
            final = dict(counters) if counters is not None else json.loads(old)
            if folded:
                _add_retired(conn, fleet, json.loads(old), sign=-1.0)
            _add_retired(conn, fleet, final)
            conn.execute("UPDATE members SET state = 'left', departed_at = ?, reason = ?, snapshot = NULL, "
                         "counters = ?, folded = 1 WHERE member_id = ?",
                         (now, reason, json.dumps(final), member_id))

        self._write(depart)

    def sweep(self, fleet: str, *, stale_after: float, forget_after: float,
              is_dead: Callable[[MemberInfo], bool] = lambda m: False) -> list[MemberInfo]:
        """Mark members that stopped beating (or whose process is known dead) ``gone``; forget old records.

        A live member is gone when its heartbeat is older than *stale_after*
        seconds, or when *is_dead* says so (its pid no longer runs on this
        host). Its last published counters join the retired totals and its
        snapshot is dropped. Members that left or went away more than
        *forget_after* seconds ago are deleted with their acknowledgements,
        and commands older than that too. Returns the members marked gone now.
        """
        now = self.clock()

        def run(conn: sqlite3.Connection) -> list[MemberInfo]:
            marked: list[MemberInfo] = []
            for member in _members(conn, fleet, ("live",)):
                stale = now - member.heartbeat_at > stale_after
                if not stale and not is_dead(member):
                    continue
                reason = (f"no heartbeat for {now - member.heartbeat_at:.1f} s" if stale
                          else f"process {member.pid} on {member.host} is gone")
                counters = conn.execute("SELECT counters FROM members WHERE member_id = ?",
                                        (member.member_id,)).fetchone()[0]
                _add_retired(conn, fleet, json.loads(counters))
                conn.execute("UPDATE members SET state = 'gone', departed_at = ?, reason = ?, snapshot = NULL, "
                             "folded = 1 WHERE member_id = ?", (now, reason, member.member_id))
                marked.append(MemberInfo(**{**member.to_dict(), "state": "gone", "departed_at": now,
                                            "reason": reason}))
            old = [r[0] for r in conn.execute(
                "SELECT member_id FROM members WHERE fleet = ? AND state != 'live' AND departed_at < ?",
                (fleet, now - forget_after))]
            for member_id in old:
                conn.execute("DELETE FROM members WHERE member_id = ?", (member_id,))
                conn.execute("DELETE FROM acks WHERE member_id = ?", (member_id,))
            gone_seqs = conn.execute("SELECT seq FROM commands WHERE fleet = ? AND issued_at < ?",
                                     (fleet, now - forget_after)).fetchall()
            if gone_seqs:
                conn.executemany("DELETE FROM acks WHERE seq = ?", gone_seqs)
                conn.executemany("DELETE FROM commands WHERE seq = ?", gone_seqs)
            return marked

        result: list[MemberInfo] = self._write(run)
        return result

    def members(self, fleet: str, *, states: Iterable[str] = ("live",)) -> list[MemberInfo]:
        """Members of *fleet* in *states*, oldest first."""
        wanted = tuple(states)
        result: list[MemberInfo] = self._read(lambda c: _members(c, fleet, wanted))
        return result

    def snapshots(self, fleet: str, known: Mapping[str, float]) -> dict[str, tuple[float, str]]:
        """The snapshots of live members whose ``snapshot_at`` differs from *known* (member -> time)."""
        def read(conn: sqlite3.Connection) -> dict[str, tuple[float, str]]:
            out: dict[str, tuple[float, str]] = {}
            for member_id, at in conn.execute(
                    "SELECT member_id, snapshot_at FROM members WHERE fleet = ? AND state = 'live' "
                    "AND snapshot_at IS NOT NULL", (fleet,)).fetchall():
                if known.get(member_id) != at:
                    row = conn.execute("SELECT snapshot FROM members WHERE member_id = ?", (member_id,)).fetchone()
                    if row is not None and row[0] is not None:
                        out[member_id] = (at, row[0])
            return out

        result: dict[str, tuple[float, str]] = self._read(read)
        return result

    def scrape(self, fleet: str) -> tuple[list[MemberInfo], dict[str, tuple[float, str]], dict[str, float]]:
        """Live members, their published snapshots and the retired counters, read in one transaction.

        One consistent state of the file: a member that is marked gone moves
        its counters to the retired totals in the same transaction that drops
        its snapshot, so the sum of both never goes backwards between reads.
        """
        def read(conn: sqlite3.Connection) -> tuple[list[MemberInfo], dict[str, tuple[float, str]], dict[str, float]]:
            members = _members(conn, fleet, ("live",))
            snaps = {r[0]: (r[1], r[2]) for r in conn.execute(
                "SELECT member_id, snapshot_at, snapshot FROM members WHERE fleet = ? AND state = 'live' "
                "AND snapshot IS NOT NULL", (fleet,))}
            retired = {k: v for k, v in conn.execute("SELECT key, value FROM retired WHERE fleet = ?", (fleet,))}
            return members, snaps, retired

        result: tuple[list[MemberInfo], dict[str, tuple[float, str]], dict[str, float]] = self._read(read)
        return result

    def retired(self, fleet: str) -> dict[str, float]:
        """The summed counters of every member that left or died (and is still remembered or not)."""
        rows = self._read(lambda c: c.execute("SELECT key, value FROM retired WHERE fleet = ?", (fleet,)).fetchall())
        return {k: v for k, v in rows}

    # -- control -----------------------------------------------------------------

    def issue(self, fleet: str, issuer: str, action: str, *, operation: str | None = None,
              args: Mapping[str, Any] | None = None, target: str | None = None) -> int:
        """Record a command (and, for a standing change, the fleet's desired state) and return its sequence number.

        Raises:
            ConfigurationError: for an unknown *action*.
        """
        if action not in ACTIONS:
            raise ConfigurationError(f"unknown fleet action {action!r}; known: {', '.join(sorted(ACTIONS))}")
        now = self.clock()

        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO commands (fleet, issued_at, issuer, target, action, operation, args) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (fleet, now, issuer, target, action, operation, json.dumps(dict(args or {}))))
            if target is None:
                _update_desired(conn, fleet, action, operation, now)
            return int(cur.lastrowid or 0)

        result: int = self._write(insert)
        return result

    def commands_after(self, fleet: str, seq: int, *, limit: int = 256) -> list[Command]:
        """Commands of *fleet* with a sequence number above *seq*, oldest first."""
        rows = self._read(lambda c: c.execute(
            "SELECT seq, issued_at, issuer, target, action, operation, args FROM commands "
            "WHERE fleet = ? AND seq > ? ORDER BY seq LIMIT ?", (fleet, seq, limit)).fetchall())
        return [Command(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6])) for r in rows]

    def join_state(self, fleet: str) -> tuple[DesiredState, int]:
        """The desired state and the last command's sequence number, read together.

        A joining member applies the state and then only the commands after
        that number: none is missed and none applied twice.
        """
        def read(conn: sqlite3.Connection) -> tuple[DesiredState, int]:
            last = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM commands WHERE fleet = ?", (fleet,)).fetchone()[0]
            return _desired(conn, fleet), int(last)

        result: tuple[DesiredState, int] = self._read(read)
        return result

    def desired(self, fleet: str) -> DesiredState:
        """The fleet's standing control state."""
        result: DesiredState = self._read(lambda c: _desired(c, fleet))
        return result

    def ack(self, seq: int, member_id: str, *, ok: bool, detail: str, result: Any = None) -> None:
        """Record what *member_id* did with command *seq* (the first answer wins)."""
        now = self.clock()
        text = None if result is None else json.dumps(result, default=str)
        self._write(lambda c: c.execute(
            "INSERT OR IGNORE INTO acks (seq, member_id, ok, detail, result, at) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, member_id, int(ok), detail, text, now)))

    def acks(self, seqs: Iterable[int]) -> dict[int, dict[str, Ack]]:
        """The acknowledgements of each of *seqs*, by member."""
        wanted = list(seqs)
        out: dict[int, dict[str, Ack]] = {s: {} for s in wanted}
        if not wanted:
            return out

        def read(conn: sqlite3.Connection) -> None:
            for seq in wanted:
                for member_id, ok, detail, result, at in conn.execute(
                        "SELECT member_id, ok, detail, result, at FROM acks WHERE seq = ?", (seq,)):
                    out[seq][member_id] = Ack(member_id, bool(ok), detail,
                                              None if result is None else json.loads(result), at)

        self._read(read)
        return out


def _members(conn: sqlite3.Connection, fleet: str, states: tuple[str, ...]) -> list[MemberInfo]:
    marks = ",".join("?" * len(states))
    rows = conn.execute(
        "SELECT member_id, fleet, pid, host, process_started_at, version, joined_at, heartbeat_at, state, "
        f"departed_at, reason, snapshot_at FROM members WHERE fleet = ? AND state IN ({marks}) "
        "ORDER BY joined_at, member_id", (fleet, *states)).fetchall()
    return [MemberInfo(*row) for row in rows]


def _add_retired(conn: sqlite3.Connection, fleet: str, counters: Mapping[str, Any], *, sign: float = 1.0) -> None:
    for key, value in counters.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            conn.execute("INSERT INTO retired (fleet, key, value) VALUES (?, ?, ?) "
                         "ON CONFLICT (fleet, key) DO UPDATE SET value = value + excluded.value",
                         (fleet, key, sign * float(value)))


def _desired(conn: sqlite3.Connection, fleet: str) -> DesiredState:
    row = conn.execute("SELECT paused, draining, paused_operations, held_operations, updated_at FROM desired "
                       "WHERE fleet = ?", (fleet,)).fetchone()
    if row is None:
        return DesiredState()
    return DesiredState(bool(row[0]), bool(row[1]), tuple(json.loads(row[2])), tuple(json.loads(row[3])), row[4])


def _update_desired(conn: sqlite3.Connection, fleet: str, action: str, operation: str | None, now: float) -> None:
    state = _desired(conn, fleet)
    paused, draining = state.paused, state.draining
    paused_ops, held_ops = set(state.paused_operations), set(state.held_operations)
    if action == "pause":
        paused = True
    elif action == "resume":
        paused = draining = False
    elif action == "drain":
        draining = True
    elif action == "pause_operation" and operation:
        paused_ops.add(operation)
    elif action == "resume_operation" and operation:
        paused_ops.discard(operation)
    elif action == "hold" and operation:
        held_ops.add(operation)
    elif action == "unhold" and operation:
        held_ops.discard(operation)
    else:
        return  # one-off actions (kill, unblock, lookups) leave no standing state
    conn.execute(
        "INSERT INTO desired (fleet, paused, draining, paused_operations, held_operations, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (fleet) DO UPDATE SET paused = excluded.paused, "
        "draining = excluded.draining, paused_operations = excluded.paused_operations, "
        "held_operations = excluded.held_operations, updated_at = excluded.updated_at",
        (fleet, int(paused), int(draining), json.dumps(sorted(paused_ops)), json.dumps(sorted(held_ops)), now))
