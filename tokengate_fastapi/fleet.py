"""The admin API's fleet mode: answers for every server process, and control that reaches every one.

With a fleet (``tokengate_lifespan(fleet_dir=...)`` or ``$TOKENGATE_FLEET_DIR``;
see :mod:`tokengate.fleet`) each server process's coordinator is a *member*,
and whichever process a request reaches answers for all of them:

* read routes (``/stats``, ``/affinity``, ``/workers``, ``/history``,
  ``/operations``, ``/health``) combine this member's live figures with the
  snapshots the other members published (at most about one heartbeat old);
  every answer names the member that produced it (``member``, and the
  ``X-TokenGate-Member`` header) and how old each member's figures are
  (``snapshot_age``). ``?scope=member`` answers for this process only.
* control routes apply the action here and send it to every other member
  (see :meth:`tokengate.fleet.Fleet.broadcast`); the answer's ``fleet`` field
  lists the members that applied it and those that did not, with why.
* token ids are fleet-unique in the admin API: ``<member>-<number>``, where
  ``<number>`` is the core's ``TaskToken.token_id`` (unchanged, unique in its
  process only). A plain number still means "this process's token".

Everything here runs on the server's loop and reads only memory (the
fleet thread keeps :attr:`~tokengate.fleet.Fleet.view` fresh); control
routes await the fleet thread without blocking the loop.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Iterable, Literal, Mapping

from fastapi import Query, Request, Response

from tokengate import OperationsCoordinator
from tokengate.fleet import MONOTONIC_COUNTS, CommandReport, Fleet, FleetView, member_row

from ._lanes import label_thread_workers, lane_workers, with_lanes, worker_lanes
from ._policies import operation_rows
from .dependencies import STATE_KEY

__all__ = ["Scope", "MEMBER_HEADER", "TOKEN_ID_PATTERN", "fleet_of", "install_snapshot_parts", "fleet_stats",
           "fleet_workers", "fleet_history", "fleet_operations", "fleet_affinity", "fleet_health", "fleet_info",
           "control", "drain_totals", "fleet_token_id", "split_token_id", "member_header", "local_stats"]

#: The response header naming the member (server process) that produced an admin answer.
MEMBER_HEADER = "X-TokenGate-Member"
#: An admin token id: ``<member>-<number>`` (fleet mode) or a plain number (this process's token).
TOKEN_ID_PATTERN = r"^(?:[0-9a-z]{1,16}-)?[0-9]{1,20}$"
_TOKEN_ID = re.compile(TOKEN_ID_PATTERN)
#: Rows of history each member publishes (the fleet-wide /history merges at most this many per other member).
SNAPSHOT_HISTORY_ROWS = 100

Scope = Annotated[Literal["fleet", "member"], Query(
    description="fleet: answer for every server process of the fleet (the default when a fleet is "
                "configured); member: this process only")]

_WORST = {"problematic": 4, "at_risk": 3, "healthy": 2, "excellent": 1, "unknown": 0}


def fleet_of(coordinator: OperationsCoordinator, scope: str = "fleet") -> Fleet | None:
    """The coordinator's fleet when it has joined one and *scope* is ``fleet``; else None."""
    fleet = getattr(coordinator, "fleet", None)
    if scope != "fleet" or not isinstance(fleet, Fleet) or fleet.member_id is None:
        return None
    return fleet


def local_stats(coordinator: OperationsCoordinator) -> dict[str, Any]:
    """``coordinator.stats()`` plus this process's ``pid`` (and ``member``); every worker row says its ``lane``."""
    stats = {**label_thread_workers(coordinator.stats()), "pid": os.getpid()}
    fleet = getattr(coordinator, "fleet", None)
    if isinstance(fleet, Fleet) and fleet.member_id is not None:
        stats["member"] = fleet.member_id
    return stats


def install_snapshot_parts(coordinator: OperationsCoordinator) -> None:
    """Make the coordinator's fleet publish what the admin API shows: stats, history (with lanes), operations.

    Called by the lifespan before the coordinator starts; a no-op without a fleet.
    The three parts share one ``stats()`` and one history read per snapshot
    (the parts run in order, in one loop callback): about a millisecond of
    the loop once per heartbeat (``benchmarks/bench_fleet.py`` measures it).
    An operation's ``lane`` comes from the published rows only.
    """
    fleet = getattr(coordinator, "fleet", None)
    if not isinstance(fleet, Fleet):
        return
    fleet.history_rows = SNAPSHOT_HISTORY_ROWS
    shared: dict[str, Any] = {}

    def stats() -> dict[str, Any]:
        snap = {**label_thread_workers(coordinator.stats()), "pid": os.getpid()}
        shared["stats"] = snap
        return snap

    def history() -> list[dict[str, Any]]:
        snap = shared.get("stats") or coordinator.stats()
        rows = with_lanes([r.to_dict() for r in coordinator.history(SNAPSHOT_HISTORY_ROWS)], worker_lanes(snap))
        shared["history"] = rows
        return rows

    def operations() -> list[dict[str, Any]]:
        snap = shared.pop("stats", None) or coordinator.stats()
        lanes: dict[str, str] = {}
        for row in shared.pop("history", None) or ():  # newest first: the first lane seen is the latest
            if row.get("lane") is not None:
                lanes.setdefault(str(row["operation_type"]), str(row["lane"]))
        return operation_rows(coordinator, snap["paused_operations"], lanes)

    fleet.snapshot_parts.update({"stats": stats, "history": history, "operations": operations})


async def member_header(request: Request, response: Response) -> None:
    """Router dependency: name this process's member in ``X-TokenGate-Member`` (when it is in a fleet)."""
    coordinator = getattr(request.state, STATE_KEY, None) or getattr(request.app.state, STATE_KEY, None)
    fleet = getattr(coordinator, "fleet", None)
    if isinstance(fleet, Fleet) and fleet.member_id is not None:
        response.headers[MEMBER_HEADER] = fleet.member_id


# -- token ids -------------------------------------------------------------------------------------------


def fleet_token_id(member: str | None, token_id: str) -> str:
    """The admin API's id of a token: ``<member>-<token_id>`` in a fleet, else the core's id."""
    return token_id if member is None else f"{member}-{token_id}"


def split_token_id(value: str) -> tuple[str | None, str]:
    """``(member or None, core token id)`` of an admin token id (validated by :data:`TOKEN_ID_PATTERN`)."""
    if not _TOKEN_ID.match(value):
        raise ValueError(f"not a token id: {value!r}")
    member, sep, number = value.rpartition("-")
    return (member if sep else None), number


# -- reading -----------------------------------------------------------------------------------------------


def _entries(fleet: Fleet, local: Any, part: str) -> list[tuple[dict[str, Any], Any]]:
    """``(member row, that member's *part*)`` for every live member; this member's part is *local* (fresh)."""
    view = fleet.view
    now = fleet.clock()
    out: list[tuple[dict[str, Any], Any]] = []
    seen_self = False
    for member in view.members:
        row = member_row(member, view, now, fleet.heartbeat_interval)
        if member.member_id == fleet.member_id:
            seen_self = True
            out.append(({**row, "snapshot_age": 0.0, "loop_stuck": False}, local))
        else:
            snap = view.snapshots.get(member.member_id, (None, {}))[1]
            out.append((row, snap.get(part) if isinstance(snap, Mapping) else None))
    if not seen_self:  # the view was refreshed before this member's row existed: answer for it anyway
        out.insert(0, ({"member": fleet.member_id, "pid": os.getpid(), "host": "", "version": "",
                        "process_started_at": 0.0, "joined_at": 0.0, "heartbeat_age": 0.0, "snapshot_age": 0.0,
                        "loop_stuck": False, "self": True}, local))
    return out


def _p99(summary: Any) -> float | None:
    return summary.get("p99") if isinstance(summary, Mapping) else None


def fleet_stats(fleet: Fleet, local: Mapping[str, Any]) -> dict[str, Any]:
    """The ``fleet`` part of ``GET /stats``: totals and a row per live member (*local* is this member's stats)."""
    view: FleetView = fleet.view
    members: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    throughput = 0.0
    pending = held = paused = draining = stuck = 0
    for row, stats in _entries(fleet, local, "stats"):
        s: Mapping[str, Any] = stats if isinstance(stats, Mapping) else {}
        c: Mapping[str, Any] = s.get("counts") or {}
        held_total = sum((s.get("held") or {}).values())
        members.append({**row, "phase": s.get("phase"), "paused": s.get("paused"), "draining": s.get("draining"),
                        "paused_operations": s.get("paused_operations") or [], "counts": dict(c),
                        "throughput_per_s": s.get("throughput_per_s"), "pending_total": s.get("pending_total"),
                        "held_total": held_total if s else None, "queue_wait_p99": _p99(s.get("queue_wait")),
                        "run_time_p99": _p99(s.get("run_time")), "uptime": s.get("uptime")})
        for key, value in c.items():
            counts[key] = counts.get(key, 0) + int(value or 0)
        throughput += float(s.get("throughput_per_s") or 0.0)
        pending += int(s.get("pending_total") or 0)
        held += held_total
        paused += bool(s.get("paused"))
        draining += bool(s.get("draining"))
        stuck += bool(row.get("loop_stuck"))
    for key in MONOTONIC_COUNTS:  # departed members' counters: fleet counters never go backwards
        counts[key] = counts.get(key, 0) + int(view.retired.get(key, 0))
    return {"member": fleet.member_id, "fleet": view.fleet, "error": view.error,
            "totals": {"members": len(members), "paused_members": paused, "draining_members": draining,
                       "stuck_members": stuck, "counts": counts, "throughput_per_s": round(throughput, 3),
                       "pending_total": pending, "held_total": held},
            "members": members, "retired": dict(view.retired), "desired": view.desired.to_dict()}


def fleet_workers(fleet: Fleet, local: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every worker of every live member, each row with its ``member`` and the ``age`` of its figures."""
    rows: list[dict[str, Any]] = []
    for row, stats in _entries(fleet, local, "stats"):
        if isinstance(stats, Mapping):
            rows += [{**w, "member": row["member"], "age": row["snapshot_age"]} for w in lane_workers(stats)]
    return rows


def fleet_history(fleet: Fleet, local: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Every live member's recent executions, newest first, with fleet token ids and ``member``.

    Other members contribute what they published (their last
    ``SNAPSHOT_HISTORY_ROWS`` calls, at most one heartbeat old).
    """
    rows: list[dict[str, Any]] = []
    for row, history in _entries(fleet, local, "history"):
        member = row["member"]
        for record in history if isinstance(history, list) else ():
            if isinstance(record, Mapping):
                rows.append({**record, "member": member,
                             "token_id": fleet_token_id(member, str(record.get("token_id")))})
    rows.sort(key=lambda r: float(r.get("finished_at") or 0.0), reverse=True)
    return rows[:limit]


def fleet_operations(fleet: Fleet, local: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per operation over the fleet: counts summed, flags of any member, worst health, per-member rows."""
    merged: dict[str, dict[str, Any]] = {}
    for row, operations in _entries(fleet, local, "operations"):
        for op_row in operations if isinstance(operations, list) else ():
            if not isinstance(op_row, Mapping) or not op_row.get("operation_type"):
                continue
            op = str(op_row["operation_type"])
            target = merged.setdefault(op, {"operation_type": op, "paused": False, "held": False, "blocked": False,
                                            "members": []})
            target["members"].append({**op_row, "member": row["member"]})
            for flag in ("paused", "held", "blocked"):
                target[flag] = bool(target[flag] or op_row.get(flag))
            for key in ("attempts", "successes", "failures"):
                if op_row.get(key) is not None:
                    target[key] = int(target.get(key) or 0) + int(op_row[key])
            health = op_row.get("health")
            if health is not None and _WORST.get(str(health), 0) >= _WORST.get(str(target.get("health")), -1):
                target["health"] = health
            if target.get("lane") is None and op_row.get("lane") is not None:
                target["lane"] = op_row["lane"]
            if op_row.get("run_time") is not None and (target.get("run_time") is None or int(
                    op_row.get("attempts") or 0) >= max(int(m.get("attempts") or 0) for m in target["members"])):
                target["run_time"] = op_row["run_time"]  # the busiest member's (percentiles cannot be summed)
    for target in merged.values():
        attempts = target.get("attempts")
        if attempts:
            target["completion_rate"] = round(int(target.get("successes") or 0) / int(attempts), 4)
    return [merged[op] for op in sorted(merged)]


def fleet_affinity(fleet: Fleet, local: Mapping[str, Any]) -> dict[str, Any]:
    """Routed counts per weight class, summed over live members and per member (with each core's routed)."""
    total: dict[str, int] = {}
    members = []
    for row, stats in _entries(fleet, local, "stats"):
        s: Mapping[str, Any] = stats if isinstance(stats, Mapping) else {}
        by_weight = {str(k): int(v) for k, v in (s.get("routed_by_weight") or {}).items()}
        for weight, value in by_weight.items():
            total[weight] = total.get(weight, 0) + value
        members.append({"member": row["member"], "pid": row["pid"], "snapshot_age": row["snapshot_age"],
                        "routed_by_weight": by_weight,
                        "cores": [{"core_id": c.get("core_id"), "routed": c.get("routed"),
                                   "routed_total": c.get("routed_total"), "queue_depth": c.get("queue_depth")}
                                  for c in s.get("cores") or ()]})
    return {"member": fleet.member_id, "routed_by_weight": total, "members": members}


def fleet_health(fleet: Fleet) -> dict[str, Any]:
    """Every live member with its heartbeat and snapshot ages, and those that left or died recently."""
    view = fleet.view
    rows = [row for row, _ in _entries(fleet, None, "stats")]
    departed = [{"member": m.member_id, "pid": m.pid, "host": m.host, "state": m.state,
                 "departed_at": m.departed_at, "reason": m.reason} for m in view.departed]
    return {"member": fleet.member_id, "fleet": view.fleet, "error": view.error, "members": rows,
            "departed": departed}


def fleet_info(coordinator: OperationsCoordinator) -> dict[str, Any]:
    """``GET /fleet``: the fleet's settings and members, or ``enabled: false`` with how to configure one."""
    fleet = getattr(coordinator, "fleet", None)
    if not isinstance(fleet, Fleet):
        return {"enabled": False, "error": "no fleet configured: pass fleet_dir to tokengate_lifespan / "
                                           "OperationsCoordinator, or set TOKENGATE_FLEET_DIR"}
    info = fleet.describe()
    rows = {row["member"]: row for row, _ in _entries(fleet, None, "stats")} if fleet.member_id else {}
    info["members"] = list(rows.values()) or info["members"]
    return {"enabled": True, **info}


# -- control -----------------------------------------------------------------------------------------------


async def control(coordinator: OperationsCoordinator, action: str, operation: str | None = None,
                  args: Mapping[str, Any] | None = None, *, timeout: float | None = None,
                  concurrent_local: bool = False) -> CommandReport | None:
    """Apply *action* on every member through the fleet; None without one (the caller then acts locally).

    An error applying it here is raised before anything is sent (see
    :meth:`tokengate.fleet.Fleet.broadcast`), so the route answers it as it
    always did.
    """
    fleet = fleet_of(coordinator)
    if fleet is None:
        return None
    return await fleet.broadcast(action, operation, args, timeout=timeout, concurrent_local=concurrent_local)


def applied_results(report: CommandReport) -> Iterable[Any]:
    """The results of the members that applied *report*'s action."""
    return (ack.result for ack in report.acks.values() if ack.ok)


def drain_totals(report: CommandReport) -> dict[str, Any]:
    """One drain report for the fleet: drained only if every member applied it and drained; sums; the longest."""
    results = [r for r in applied_results(report) if isinstance(r, Mapping)]
    complete = not report.missing and all(a.ok for a in report.acks.values())
    return {"drained": complete and bool(results) and all(bool(r.get("drained")) for r in results),
            "settled_during_drain": sum(int(r.get("settled_during_drain") or 0) for r in results),
            "remaining": sum(int(r.get("remaining") or 0) for r in results),
            "elapsed": max((float(r.get("elapsed") or 0.0) for r in results), default=0.0)}
