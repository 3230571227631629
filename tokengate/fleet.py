"""One app run as several server processes, observed and controlled as one fleet.

With ``uvicorn --workers N`` or gunicorn, each server process has its own
coordinator. Give them the same fleet directory (``fleet_dir=`` on
:class:`~tokengate.OperationsCoordinator` or ``tokengate_lifespan``, or the
``TOKENGATE_FLEET_DIR`` environment variable) and each coordinator becomes a
**member** of one fleet, sharing one SQLite file (:mod:`tokengate.fleet_store`):

* **membership** -- a member registers (pid, host, process start time,
  version) when its coordinator starts, beats every ``heartbeat_interval``
  (1 s) and leaves when it stops. A member that stops beating for
  ``missed_heartbeats`` intervals (3), or whose pid no longer runs on this
  host, is marked ``gone`` by whichever member notices first; its figures
  leave the view and its counters join the retired totals.
* **snapshots** -- every heartbeat a member publishes a snapshot (its
  ``stats()``, recent history, and whatever parts the web layer adds). The
  snapshot is built on the coordinator's loop (a few hundred microseconds,
  once a second) and encoded and written on the fleet thread. Every member
  reads the others' snapshots into :attr:`Fleet.view`, so any process can
  answer for the whole fleet without asking the others.
* **control** -- :meth:`Fleet.broadcast` applies an action here at once and
  writes a command that every other member's fleet thread finds within
  ``poll_interval`` (0.1 s) and applies on its own loop; each answers with an
  acknowledgement, and the caller learns which members applied it (and why
  the others did not) within ``ack_timeout``. Standing changes (pause, drain,
  pause or hold an operation) are also kept as the fleet's desired state,
  which a member applies when it joins: a process started while the fleet is
  paused starts paused.

Nothing runs on the hot path: a call never touches the fleet. All file I/O
happens on the fleet thread (one per coordinator, a daemon named
``<name>-fleet``), fed by a bounded queue; the loop only builds the snapshot
dict and runs the applied commands. A fleet file that cannot be opened or
written never stops the coordinator: the error is logged (at most once a
minute) and shown in :attr:`FleetView.error`, and the thread keeps retrying.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .errors import ConfigurationError
from .fleet_store import ACTIONS, Ack, Command, DesiredState, FleetStore, FleetStoreError, MemberInfo, check_fleet_dir
from .quarantine.writer import Throttled

if TYPE_CHECKING:
    from .coordinator import OperationsCoordinator

__all__ = ["FLEET_DIR_ENV_VAR", "CommandReport", "Fleet", "FleetView", "fleet_dir_from_env",
           "MONOTONIC_COUNTS"]

logger = logging.getLogger("tokengate.fleet")

FLEET_DIR_ENV_VAR = "TOKENGATE_FLEET_DIR"
#: ``stats()["counts"]`` keys that only grow: summed over live members plus the retired ones.
MONOTONIC_COUNTS = ("accepted", "settled", "completed", "failed", "killed", "timeout", "rejected", "quarantined",
                    "rejected_at_submit", "retries", "late_completions_discarded")
_HOST = socket.gethostname()
_LOG_INTERVAL = 60.0


def fleet_dir_from_env(environ: Mapping[str, str] | None = None) -> Path | None:
    """The fleet directory named by ``$TOKENGATE_FLEET_DIR`` (None when unset or empty)."""
    value = (os.environ if environ is None else environ).get(FLEET_DIR_ENV_VAR, "").strip()
    return check_fleet_dir(value) if value else None


def _process_start(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def _pid_is_dead(member: MemberInfo) -> bool:
    """True only when *member*'s process certainly no longer runs (same host, pid gone or reused)."""
    if member.host != _HOST or not member.process_started_at:
        return False
    try:
        return abs(psutil.Process(member.pid).create_time() - member.process_started_at) >= 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # access denied, zombie: it exists
        return False


@dataclass(frozen=True)
class FleetView:
    """What one member knows of the fleet, refreshed by its fleet thread every heartbeat.

    ``snapshots`` maps each live member's id to ``(published_at, snapshot)``;
    this member's own entry is its last published one (answers use a fresh
    one instead). ``retired`` holds the summed counters of members that left
    or died. Times are seconds since the epoch.
    """

    fleet: str
    member_id: str | None = None
    refreshed_at: float | None = None
    members: tuple[MemberInfo, ...] = ()
    departed: tuple[MemberInfo, ...] = ()
    snapshots: Mapping[str, tuple[float, Mapping[str, Any]]] = field(default_factory=dict)
    retired: Mapping[str, float] = field(default_factory=dict)
    desired: DesiredState = DesiredState()
    error: str | None = None

    def member(self, member_id: str) -> MemberInfo | None:
        """The live member with this id, or None."""
        for m in self.members:
            if m.member_id == member_id:
                return m
        return None


@dataclass
class CommandReport:
    """Which members applied a broadcast action: ``acks`` (by member, ok or not) and ``missing`` (why not).

    ``missing`` names live members that had not answered by the deadline,
    and members that left or died before answering. ``error`` is set when
    the command could not be written to the fleet file at all (only this
    member then applied it).
    """

    action: str
    operation: str | None
    seq: int | None
    issuer: str | None
    acks: dict[str, Ack] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    @property
    def applied(self) -> list[str]:
        """Members that applied it."""
        return [m for m, a in self.acks.items() if a.ok]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``applied`` and ``not_applied`` lists with each member's pid and result or reason."""
        applied = [{"member": m, "pid": self.pids.get(m), "result": a.result} for m, a in self.acks.items() if a.ok]
        not_applied = [{"member": m, "pid": self.pids.get(m), "reason": a.detail}
                       for m, a in self.acks.items() if not a.ok]
        not_applied += [{"member": m, "pid": self.pids.get(m), "reason": why} for m, why in self.missing.items()]
        return {"command": self.seq, "action": self.action, "operation": self.operation, "member": self.issuer,
                "applied": applied, "not_applied": not_applied, "error": self.error}


@dataclass
class _Wait:
    """A broadcast waiting for acknowledgements (fleet thread only)."""

    report: CommandReport
    waiting: set[str]
    deadline: float
    future: concurrent.futures.Future[CommandReport]


_STOP = "stop"


class Fleet:
    """The fleet membership of one coordinator: its thread, its view of the others, and fleet-wide control.

    Built by the coordinator for ``fleet_dir`` (or ``$TOKENGATE_FLEET_DIR``),
    started with it and stopped with it; nothing here is needed by callers
    except :attr:`view`, :attr:`member_id`, :meth:`broadcast` and
    :attr:`snapshot_parts` (the web layer adds its own parts there).

    Args:
        directory: The fleet directory (created if missing).
        heartbeat_interval: Seconds between heartbeats and published
            snapshots (default 1).
        missed_heartbeats: Heartbeats a member may miss before another marks
            it gone (default 3): a member killed without leaving disappears
            within about ``(missed_heartbeats + 1) x heartbeat_interval``, or
            within one interval when it ran on this host (its pid is checked).
        poll_interval: Seconds between two looks for new commands and
            acknowledgements (default 0.1): the delay before another member
            applies a broadcast action.
        ack_timeout: Seconds :meth:`broadcast` waits for the other members'
            acknowledgements by default (2).
        history_rows: Execution records in each published snapshot (200; the FastAPI lifespan sets 100).
        forget_after: Seconds after which departed members and old commands
            are deleted from the file (600).
        queue_size: Bound of the fleet thread's queue (1024).
        clock: Wall-clock seconds shared by every member (``time.time``).

    Raises:
        ConfigurationError: for a bad directory or interval.
    """

    def __init__(self, directory: str | os.PathLike[str], *, heartbeat_interval: float = 1.0,
                 missed_heartbeats: int = 3, poll_interval: float = 0.1, ack_timeout: float = 2.0,
                 history_rows: int = 200, forget_after: float = 600.0, queue_size: int = 1024,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = check_fleet_dir(directory)
        for label, value, high in (("heartbeat_interval", heartbeat_interval, 3600.0),
                                   ("poll_interval", poll_interval, 60.0), ("ack_timeout", ack_timeout, 3600.0),
                                   ("forget_after", forget_after, 1e9)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
                raise ConfigurationError(f"{label} must be a number of seconds in (0, {high:g}], got {value!r}")
        for label, count, low in (("missed_heartbeats", missed_heartbeats, 1), ("history_rows", history_rows, 0),
                                  ("queue_size", queue_size, 1)):
            if isinstance(count, bool) or not isinstance(count, int) or not low <= count <= 1_000_000:
                raise ConfigurationError(f"{label} must be a whole number in [{low}, 1000000], got {count!r}")
        self.heartbeat_interval = float(heartbeat_interval)
        self.missed_heartbeats = missed_heartbeats
        self.stale_after = self.heartbeat_interval * missed_heartbeats
        self.poll_interval = float(poll_interval)
        self.ack_timeout = float(ack_timeout)
        self.history_rows = history_rows
        self.forget_after = float(forget_after)
        self.clock = clock
        self.name = "tokengate"
        self.member_id: str | None = None
        self.view = FleetView(fleet=self.name)
        #: Parts of each published snapshot, by name: zero-argument callables run on the coordinator's loop.
        self.snapshot_parts: dict[str, Callable[[], Any]] = {}
        #: Seconds the last snapshot took to build on the loop (what the fleet costs the loop per heartbeat).
        self.last_build_seconds = 0.0
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._coordinator: OperationsCoordinator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._joined = threading.Event()
        self._closed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._snapshot_pending = False
        self._log = Throttled(logger, _LOG_INTERVAL)
        self._pid = os.getpid()

    # -- lifecycle (coordinator side) ------------------------------------------------

    def start(self, coordinator: OperationsCoordinator) -> None:
        """Start the fleet thread for *coordinator*, whose loop runs now. Thread: the coordinator's loop thread."""
        if self._thread is not None:
            return
        self._coordinator = coordinator
        self._loop = coordinator.loop
        self.name = coordinator.name
        self.view = FleetView(fleet=self.name)
        self.snapshot_parts.setdefault("stats", coordinator.stats)
        self.snapshot_parts.setdefault("history", self._history_part)
        self._thread = threading.Thread(target=self._run, name=f"{coordinator.name}-fleet", daemon=True)
        self._thread.start()

    def _history_part(self) -> list[dict[str, Any]]:
        coordinator = self._coordinator
        if coordinator is None or not self.history_rows:
            return []
        return [r.to_dict() for r in coordinator.history(self.history_rows)]

    async def joined(self, timeout: float = 2.0) -> bool:
        """Wait (without blocking the loop) until this member joined and applied the fleet's desired state.

        Bounded by *timeout*: a fleet file that cannot be used does not hold
        the coordinator's start (the thread keeps trying). Returns whether it joined.
        """
        if self._joined.is_set():
            return self.member_id is not None
        deadline = time.monotonic() + timeout
        # The join's last step runs on this loop, so poll the event instead of blocking on it.
        while not self._joined.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if not self._joined.is_set():
            logger.error("fleet %s: not joined after %.1f s (%s); serving on, the fleet thread keeps trying",
                         self.directory, timeout, self.view.error or "the fleet file is slow")
        return self.member_id is not None

    def wait_joined(self, timeout: float = 2.0) -> bool:
        """:meth:`joined` for a thread other than the coordinator's loop (a standalone coordinator's start)."""
        self._joined.wait(timeout)
        return self.member_id is not None

    async def aclose(self, timeout: float = 5.0) -> None:
        """Leave the fleet (final counters join the retired totals) and end the thread. Thread: the loop."""
        thread = self._thread
        if thread is None or self._closed.done():
            return
        counters = self._counters_now()
        self._put_blocking((_STOP, counters))
        try:
            await asyncio.wait_for(asyncio.wrap_future(self._closed), timeout)
        except asyncio.TimeoutError:
            logger.warning("fleet %s: the fleet thread did not leave within %.1f s (the file is locked?); "
                           "others will mark this member gone", self.directory, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """:meth:`aclose` from a thread other than the loop (tests, standalone use)."""
        thread = self._thread
        if thread is None or self._closed.done():
            return
        self._put_blocking((_STOP, None))
        try:
            self._closed.result(timeout)
        except concurrent.futures.TimeoutError:
            logger.warning("fleet %s: the fleet thread did not leave within %.1f s", self.directory, timeout)

    def _counters_now(self) -> dict[str, float] | None:
        coordinator = self._coordinator
        if coordinator is None:
            return None
        try:
            return _counters(coordinator.stats())
        except Exception:  # the final figures are a nicety; leaving matters more
            logger.debug("fleet: could not read the final counters", exc_info=True)
            return None

    def _put(self, item: tuple[Any, ...]) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            self._log(logging.ERROR, "fleet %s: the fleet thread's queue is full (%d); dropping a %s",
                      self.directory, self._queue.maxsize, item[0])
            return False

    def _put_blocking(self, item: tuple[Any, ...]) -> None:
        try:
            self._queue.put(item, timeout=1.0)
        except queue.Full:  # the thread is stuck on the file: it will notice the stop flag instead
            logger.warning("fleet %s: queue full while stopping", self.directory)

    # -- control (loop side) -----------------------------------------------------------

    async def broadcast(self, action: str, operation: str | None = None, args: Mapping[str, Any] | None = None,
                        *, target: str | None = None, timeout: float | None = None,
                        concurrent_local: bool = False) -> CommandReport:
        """Apply *action* here (unless *target* is another member) and on every other live member.

        By default it is applied here first, and an error here (a bad
        operation name, a policy this coordinator lacks) is raised before
        anything is sent, as it would fail on the others too. With
        *concurrent_local* (a waiting drain) the command is sent first and
        applied here meanwhile; an error here is then reported in the result.
        Returns once every other live member acknowledged it, or after
        *timeout* seconds (default ``ack_timeout``) with the silent ones in
        ``missing``. With *target*, only that member applies it (token
        look-ups and kills). Thread: the coordinator's loop.

        Raises:
            ConfigurationError: for an unknown action.
            Exception: whatever applying it here raised (not with *concurrent_local*).
        """
        if action not in ACTIONS:
            raise ConfigurationError(f"unknown fleet action {action!r}; known: {', '.join(sorted(ACTIONS))}")
        wait = self.ack_timeout if timeout is None else max(0.0, float(timeout))
        me = self.member_id
        key = me or f"pid-{self._pid}"
        report = CommandReport(action, operation, None, me)
        here = target is None or target == me or me is None
        local: Ack | None = None
        if here and not concurrent_local:
            result = await self._execute(action, operation, args or {})  # raises: nothing was sent
            local = Ack(key, True, "applied", result, self.clock())
        future: concurrent.futures.Future[CommandReport] | None = None
        if me is not None and target != me:
            future = concurrent.futures.Future()
            if not self._put(("issue", action, operation, dict(args or {}), target, wait, future)):
                future = None
                report.error = "the fleet thread's queue is full; applied on this member only"
        elif me is None:
            report.error = self.view.error or "this member has not joined the fleet yet; applied on this member only"
        if here and local is None:
            local = await self._apply_here(action, operation, args or {})
        if future is not None:
            report = await asyncio.wrap_future(future)
        if local is not None:
            report.acks = {key: local, **report.acks}
            report.pids = {key: self._pid, **report.pids}
        return report

    async def scrape(self, timeout: float = 5.0) -> FleetView:
        """Every live member's last published snapshot and the retired counters, read from the file now.

        For ``/metrics``: whichever process is asked, the answer is the file's
        latest state (this member included, as last published), so counters
        never go backwards between two scrapes that reach different processes.
        The read runs on the fleet thread. Thread: the coordinator's loop.

        Raises:
            RuntimeError: when the fleet has not joined, or the read failed or
                did not finish within *timeout* seconds.
        """
        if self.member_id is None:
            raise RuntimeError(self.view.error or "this member has not joined the fleet")
        future: concurrent.futures.Future[FleetView] = concurrent.futures.Future()
        if not self._put(("scrape", future)):
            raise RuntimeError("the fleet thread's queue is full")
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def _apply_here(self, action: str, operation: str | None, args: Mapping[str, Any]) -> Ack:
        try:
            result = await self._execute(action, operation, args)
        except Exception as exc:  # reported to the operator as this member's answer
            return Ack(self.member_id or "", False, f"{type(exc).__name__}: {exc}", None, self.clock())
        return Ack(self.member_id or "", True, "applied", result, self.clock())

    async def _execute(self, action: str, operation: str | None, args: Mapping[str, Any]) -> Any:
        """Apply one action to this member's coordinator. Thread: the coordinator's loop."""
        c = self._coordinator
        if c is None or not c.running:
            raise RuntimeError("the coordinator is not running")
        if action in ("pause_operation", "resume_operation", "hold", "unhold", "unblock", "kill_operation") \
                and not operation:
            raise ConfigurationError(f"{action} needs an operation type")
        if action == "pause":
            c.pause()
        elif action == "resume":
            c.resume()
        elif action == "drain":
            wait = bool(args.get("wait", True))
            timeout = float(args.get("timeout", 30.0)) if wait else 0.0
            return (await c.drain(timeout)).to_dict()
        elif action == "pause_operation":
            c.pause(operation)
        elif action == "resume_operation":
            c.resume(operation)
        elif action == "hold":
            c.hold(str(operation))
        elif action == "unhold":
            c.unhold(str(operation))
        elif action == "unblock":
            return {"was_blocked": c.unblock(str(operation))}
        elif action == "kill_operation":
            return {"killed": c.kill_operation(str(operation))}
        elif action == "kill_token":
            token_id = str(args.get("token_id"))
            result = c.kill(token_id).to_dict()
            if not result["found"]:
                result["record"] = c.find_token_record(token_id)
            return result
        elif action == "get_token":
            return {"record": c.find_token_record(str(args.get("token_id")))}
        return {"paused": c.paused, "draining": c.draining, "phase": "running" if c.running else "stopped"}

    def _apply_command(self, command: Command) -> None:
        """Run a command found in the file on this loop, then acknowledge it. Thread: the loop."""
        async def run() -> None:
            ack = await self._apply_here(command.action, command.operation, command.args)
            self._put(("ack", command.seq, ack))

        asyncio.get_running_loop().create_task(run(), name=f"tokengate-fleet-command-{command.seq}")

    def _apply_desired(self, desired: DesiredState) -> None:
        """Bring a joining member to the fleet's standing state, then mark it joined. Thread: the loop."""
        async def run() -> None:
            c = self._coordinator
            try:
                if c is not None and c.running:
                    if desired.paused:
                        c.pause()
                    for op in desired.paused_operations:
                        c.pause(op)
                    for op in desired.held_operations:
                        try:
                            c.hold(op)
                        except ConfigurationError as exc:
                            logger.warning("fleet: cannot hold %r as the fleet does: %s", op, exc)
                    if desired.draining:
                        await c.drain(0)
                    if desired != DesiredState():
                        logger.warning("fleet member %s joined in the fleet's standing state: %s",
                                       self.member_id, desired.to_dict())
            finally:
                self._joined.set()

        asyncio.get_running_loop().create_task(run(), name="tokengate-fleet-join")

    def _build_snapshot(self) -> None:
        """Build this member's snapshot (a plain dict) and hand it to the fleet thread. Thread: the loop."""
        self._snapshot_pending = False
        started = time.perf_counter()
        parts: dict[str, Any] = {}
        for name, build in list(self.snapshot_parts.items()):
            try:
                parts[name] = build()
            except Exception:
                self._log(logging.ERROR, "fleet: building the %r part of the snapshot failed", name)
                logger.debug("fleet: snapshot part %r failed", name, exc_info=True)
        self.last_build_seconds = time.perf_counter() - started
        self._put(("publish", parts))

    # -- the fleet thread ----------------------------------------------------------------

    def _run(self) -> None:
        store: FleetStore | None = None
        last_seq = 0
        waits: dict[int, _Wait] = {}
        known: dict[str, tuple[float, Mapping[str, Any]]] = {}
        next_beat = next_poll = time.monotonic()
        final: dict[str, float] | None = None
        try:
            while True:
                now = time.monotonic()
                try:
                    item = self._queue.get(timeout=max(0.0, min(next_beat, next_poll) - now))
                except queue.Empty:
                    item = None
                if item is not None and item[0] == _STOP:
                    final = item[1]
                    break
                if store is None and time.monotonic() >= next_beat:
                    store, last_seq = self._join()
                if item is not None:
                    self._handle(store, item, waits)
                now = time.monotonic()
                if store is not None and now >= next_poll:
                    last_seq = self._poll(store, last_seq, waits)
                    next_poll = now + self.poll_interval
                if now >= next_beat:
                    if store is not None:
                        known = self._beat(store, known)
                    next_beat = now + self.heartbeat_interval
        finally:
            self._leave(store, final, waits)

    def _join(self) -> tuple[FleetStore | None, int]:
        try:
            store = FleetStore(self.directory, clock=self.clock)
        except FleetStoreError as exc:
            self._failed(exc)
            return None, 0
        try:
            # Mark dead members gone first: whether this member is the first live one decides
            # whether it inherits the fleet's standing state.
            store.sweep(self.name, stale_after=self.stale_after, forget_after=self.forget_after,
                        is_dead=_pid_is_dead)
            self.member_id = store.register(self.name, pid=self._pid, host=_HOST,
                                            process_started_at=_process_start(self._pid),
                                            version=_version(), member_id=self.member_id)
            desired, last_seq = store.join_state(self.name)
        except FleetStoreError as exc:
            self._failed(exc)
            store.close()
            return None, 0
        logger.info("fleet %s: member %s joined (pid %d)", self.directory, self.member_id, self._pid)
        self.view = FleetView(fleet=self.name, member_id=self.member_id, desired=desired)
        self._call_on_loop(self._apply_desired, desired)
        return store, last_seq

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> bool:
        loop = self._loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the loop closed meanwhile
            return False

    def _failed(self, exc: BaseException) -> None:
        self.view = dataclasses.replace(self.view, error=str(exc))
        self._log(logging.ERROR, "fleet %s: %s (the coordinator keeps serving; retrying every %.1f s)",
                  self.directory, exc, self.heartbeat_interval)

    def _recovered(self) -> None:
        if self.view.error is not None:
            logger.warning("fleet %s: the fleet file works again", self.directory)
            self._log.reset()

    def _handle(self, store: FleetStore | None, item: tuple[Any, ...], waits: dict[int, _Wait]) -> None:
        kind = item[0]
        if kind == "publish":
            if store is None or self.member_id is None:
                return
            parts: dict[str, Any] = item[1]
            try:
                text = _encode(parts)
                if not store.heartbeat(self.member_id, snapshot=text, counters=_counters(parts.get("stats"))):
                    store.register(self.name, pid=self._pid, host=_HOST,
                                   process_started_at=_process_start(self._pid), version=_version(),
                                   member_id=self.member_id)
            except (FleetStoreError, TypeError, ValueError) as exc:
                self._failed(exc)
        elif kind == "ack":
            if store is None or self.member_id is None:
                return
            seq, ack = item[1], item[2]
            try:
                store.ack(seq, self.member_id, ok=ack.ok, detail=ack.detail, result=ack.result)
            except FleetStoreError as exc:
                self._failed(exc)
        elif kind == "scrape":
            future = item[1]
            if store is None:
                future.set_exception(RuntimeError(self.view.error or "the fleet file is not open"))
                return
            try:
                live, snaps, retired = store.scrape(self.name)
                parsed = {m: (at, json.loads(text)) for m, (at, text) in snaps.items()}
            except (FleetStoreError, ValueError) as exc:
                future.set_exception(RuntimeError(f"reading the fleet file failed: {exc}"))
                return
            future.set_result(dataclasses.replace(self.view, members=tuple(live), snapshots=parsed,
                                                  retired=retired, refreshed_at=self.clock()))
        elif kind == "issue":
            _, action, operation, args, target, wait, future = item
            report = CommandReport(action, operation, None, self.member_id)
            if store is None or self.member_id is None:
                report.error = self.view.error or "the fleet file is not open"
                future.set_result(report)
                return
            try:
                report.seq = store.issue(self.name, self.member_id, action, operation=operation, args=args,
                                         target=target)
                live = store.members(self.name)
            except FleetStoreError as exc:
                self._failed(exc)
                report.error = f"the command could not be written to the fleet file: {exc}"
                future.set_result(report)
                return
            others = {m.member_id: m for m in live if m.member_id != self.member_id}
            report.pids.update({m: info.pid for m, info in others.items()})
            if target is not None and target not in others:
                report.missing[target] = "not a live member of the fleet"
                future.set_result(report)
                return
            waiting = set(others) if target is None else {target}
            if not waiting:
                future.set_result(report)
                return
            waits[report.seq] = _Wait(report, waiting, time.monotonic() + wait, future)

    def _poll(self, store: FleetStore, last_seq: int, waits: dict[int, _Wait]) -> int:
        try:
            commands = store.commands_after(self.name, last_seq)
            for command in commands:
                last_seq = command.seq
                if command.issuer == self.member_id or command.target not in (None, self.member_id):
                    continue
                if not self._call_on_loop(self._apply_command, command):
                    store.ack(command.seq, str(self.member_id), ok=False, detail="the coordinator's loop is closed")
            if waits:
                self._collect(store, waits)
        except FleetStoreError as exc:
            self._failed(exc)
        return last_seq

    def _collect(self, store: FleetStore, waits: dict[int, _Wait]) -> None:
        acks = store.acks(waits)
        live = {m.member_id for m in store.members(self.name)}
        now = time.monotonic()
        for seq in list(waits):
            wait = waits[seq]
            for member_id, ack in acks.get(seq, {}).items():
                if member_id in wait.waiting:
                    wait.report.acks[member_id] = ack
                    wait.waiting.discard(member_id)
            for member_id in list(wait.waiting):
                if member_id not in live:
                    wait.report.missing[member_id] = "the member left or died before applying it"
                    wait.waiting.discard(member_id)
            if not wait.waiting or now >= wait.deadline:
                for member_id in wait.waiting:
                    wait.report.missing[member_id] = "no acknowledgement within the deadline (the member is " \
                                                     "busy or stuck; a standing change still applies when it polls)"
                del waits[seq]
                wait.future.set_result(wait.report)

    def _beat(self, store: FleetStore,
              known: dict[str, tuple[float, Mapping[str, Any]]]) -> dict[str, tuple[float, Mapping[str, Any]]]:
        assert self.member_id is not None
        try:
            if not store.heartbeat(self.member_id):
                store.register(self.name, pid=self._pid, host=_HOST, process_started_at=_process_start(self._pid),
                               version=_version(), member_id=self.member_id)
            gone = store.sweep(self.name, stale_after=self.stale_after, forget_after=self.forget_after,
                               is_dead=lambda m: m.member_id != self.member_id and _pid_is_dead(m))
            for member in gone:
                logger.warning("fleet member %s (pid %d on %s) is gone: %s", member.member_id, member.pid,
                               member.host, member.reason)
            live = store.members(self.name)
            departed = store.members(self.name, states=("left", "gone"))
            changed = store.snapshots(self.name, {m: at for m, (at, _snap) in known.items()})
            retired = store.retired(self.name)
            desired = store.desired(self.name)
        except FleetStoreError as exc:
            self._failed(exc)
            return known
        ids = {m.member_id for m in live}
        fresh = {m: v for m, v in known.items() if m in ids}
        for member_id, (at, text) in changed.items():
            try:
                fresh[member_id] = (at, json.loads(text))
            except ValueError:
                logger.warning("fleet member %s published a snapshot that is not JSON; ignored", member_id)
        self._recovered()
        self.view = FleetView(fleet=self.name, member_id=self.member_id, refreshed_at=self.clock(),
                              members=tuple(live), departed=tuple(departed), snapshots=fresh, retired=retired,
                              desired=desired, error=None)
        # The next snapshot: built on the loop, written by this thread when it arrives.
        if not self._snapshot_pending:
            # Set before scheduling: the loop may build (and clear the flag) before call_soon_threadsafe returns.
            self._snapshot_pending = True
            if not self._call_on_loop(self._build_snapshot):
                self._snapshot_pending = False
        return fresh

    def _leave(self, store: FleetStore | None, final: dict[str, float] | None, waits: dict[int, _Wait]) -> None:
        for wait in waits.values():
            for member_id in wait.waiting:
                wait.report.missing[member_id] = "this member stopped before the answer arrived"
            wait.future.set_result(wait.report)
        # Requests still queued: answer them so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item[0] == "issue":
                item[-1].set_result(CommandReport(item[1], item[2], None, self.member_id,
                                                  error="the fleet stopped"))
            elif item[0] == "scrape":
                item[1].set_exception(RuntimeError("the fleet stopped"))
        try:
            if store is not None and self.member_id is not None:
                store.leave(self.member_id, counters=final)
                logger.info("fleet %s: member %s left", self.directory, self.member_id)
        except FleetStoreError as exc:
            logger.warning("fleet %s: could not record that member %s left (%s); others will mark it gone",
                           self.directory, self.member_id, exc)
        finally:
            if store is not None:
                store.close()
            self._joined.set()
            if not self._closed.done():
                self._closed.set_result(None)

    # -- reading ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The fleet's settings and this member's view of it, JSON-ready (for ``GET /fleet``)."""
        view = self.view
        now = self.clock()
        return {
            "directory": str(self.directory),
            "fleet": view.fleet,
            "member": self.member_id,
            "joined": self.member_id is not None and view.error is None,
            "error": view.error,
            "heartbeat_interval": self.heartbeat_interval,
            "stale_after": self.stale_after,
            "poll_interval": self.poll_interval,
            "snapshot_build_seconds": round(self.last_build_seconds, 6),
            "desired": view.desired.to_dict(),
            "members": [member_row(m, view, now, self.heartbeat_interval) for m in view.members],
            "departed": [{**m.to_dict(), "snapshot_at": None} for m in view.departed],
            "retired": dict(view.retired),
        }

    def __repr__(self) -> str:
        return f"<Fleet {str(self.directory)!r} member={self.member_id} members={len(self.view.members)}>"


def member_row(member: MemberInfo, view: FleetView, now: float, heartbeat_interval: float) -> dict[str, Any]:
    """One live member as seen in *view*: identity, heartbeat and snapshot ages, and whether its loop looks stuck.

    ``loop_stuck``: its fleet thread still beats, but its event loop has not
    built a snapshot for four heartbeats (something blocks that loop). Ages
    are measured from *view*'s last refresh, so they include up to one
    heartbeat of this member's own delay.
    """
    snap_at = view.snapshots.get(member.member_id, (member.snapshot_at, None))[0]
    heartbeat_age = max(0.0, now - member.heartbeat_at)
    snapshot_age = None if snap_at is None else max(0.0, now - snap_at)
    age = now - member.joined_at if snapshot_age is None else snapshot_age
    stuck = heartbeat_age < 2 * heartbeat_interval and age > 4 * heartbeat_interval
    return {"member": member.member_id, "pid": member.pid, "host": member.host, "version": member.version,
            "process_started_at": member.process_started_at, "joined_at": member.joined_at,
            "heartbeat_age": round(heartbeat_age, 3),
            "snapshot_age": None if snapshot_age is None else round(snapshot_age, 3),
            "loop_stuck": bool(stuck), "self": member.member_id == view.member_id}


def _counters(stats: Any) -> dict[str, float]:
    counts = stats.get("counts") if isinstance(stats, Mapping) else None
    if not isinstance(counts, Mapping):
        return {}
    return {k: float(counts.get(k) or 0) for k in MONOTONIC_COUNTS}


def _encode(parts: Mapping[str, Any]) -> str:
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    try:
        return json.dumps(parts, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:  # a NaN or an infinity somewhere: rare, so only then walk the tree
        return json.dumps(clean(parts), separators=(",", ":"), allow_nan=False, default=str)


def _version() -> str:
    from . import __version__

    return str(__version__)
