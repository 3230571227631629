"""Admin routes about the pool: statistics, workers, history, single tokens, drain/pause/resume.

Part of :func:`tokengate_fastapi.admin_router`; every handler is ``async def``
and protected by the router's auth dependency.
"""

import json
import os
from typing import Annotated, Any, Callable, Sequence

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends
from pydantic import ValidationError

from tokengate import OperationsCoordinator, TokenState
from tokengate.fleet import CommandReport

from ._lanes import lane_workers, with_lanes, worker_lanes
from .dependencies import CoordinatorDep
from .errors import AdminError, ErrorCode
from .fleet import (TOKEN_ID_PATTERN, Scope, control, drain_totals, fleet_affinity, fleet_history, fleet_of,
                    fleet_stats, fleet_token_id, fleet_workers, local_stats, split_token_id)
from .schemas import (
    AffinityResponse,
    DrainReport,
    DrainRequest,
    ExecutionRecord,
    FleetControl,
    KillResult,
    PoolState,
    StatsResponse,
    TokenRecord,
    WorkerInfo,
    error_responses,
)

__all__ = ["add_pool_routes", "stats_snapshot"]

TokenId = Annotated[str, Path(pattern=TOKEN_ID_PATTERN, description=(
    "A token id, as in /history: `<member>-<number>` in a fleet (the member holding it), or a number "
    "(a token of the process that receives the request)."))]


def stats_snapshot(coordinator: OperationsCoordinator, scope: str = "fleet") -> dict[str, Any]:
    """``coordinator.stats()`` plus this process's ``pid``; every worker row says its ``lane``.

    In a fleet (and with *scope* ``fleet``) it also carries ``member`` and
    ``fleet``: totals and a row per live member.
    """
    snap = local_stats(coordinator)
    fleet = fleet_of(coordinator, scope)
    if fleet is not None:
        snap["fleet"] = fleet_stats(fleet, snap)
    return snap


def _pool_state(coordinator: OperationsCoordinator, report: CommandReport | None = None) -> PoolState:
    stats = coordinator.stats()
    fleet = fleet_of(coordinator)
    return PoolState(pid=os.getpid(), phase=stats["phase"], paused=stats["paused"], draining=stats["draining"],
                     inflight=stats["counts"]["inflight"], member=None if fleet is None else fleet.member_id,
                     fleet=None if report is None else FleetControl.model_validate(report.to_dict()))


def _not_found(token_id: str, why: str = "unknown, or settled too long ago to be in the history") -> AdminError:
    return AdminError(404, ErrorCode.TOKEN_NOT_FOUND, f"no token {token_id!r}: {why}", token_id=token_id)


async def _remote_token(coordinator: OperationsCoordinator, action: str, token_id: str) -> tuple[str | None, Any]:
    """Ask the member named in a fleet token id; ``(member, its result)``, member None when it is this one.

    Raises:
        AdminError: 404 when the member is not a live member of the fleet (or there is no fleet).
    """
    member, number = split_token_id(token_id)
    fleet = fleet_of(coordinator)
    if member is None or (fleet is not None and member == fleet.member_id):
        return None, number
    if fleet is None:
        raise _not_found(token_id, f"member {member!r} is not this process, and no fleet is configured")
    report = await fleet.broadcast(action, args={"token_id": number}, target=member)
    ack = report.acks.get(member)
    if ack is None or not ack.ok:
        why = report.missing.get(member) or (ack.detail if ack is not None else report.error) or "no answer"
        raise _not_found(token_id, f"member {member!r} did not answer: {why}")
    return member, ack.result


def _token_record(record: dict[str, Any]) -> dict[str, Any]:
    state = str(record.get("state"))
    settled = state in {s.value for s in TokenState if s.is_terminal}
    return {**record, "settled": settled}


async def _drain_body(request: Request) -> DrainRequest | None:
    """The JSON body of ``POST /drain`` (None when empty or ``null``), validated as :class:`DrainRequest`.

    Read in the handler, not declared as a FastAPI body parameter: FastAPI
    parses a declared body before any dependency runs, so a malformed body
    would answer 422 to a client the auth dependency should have refused.

    Raises:
        RequestValidationError: for invalid JSON or invalid options (422).
    """
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no text
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": str(exc)}}]) from None
    if data is None:
        return None
    try:
        return DrainRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])}
                                      for error in exc.errors(include_url=False)]) from None


# Optional, and `null` means "no options" like an empty body (documented, so contract tests accept it).
_DRAIN_BODY_SCHEMA = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": {"anyOf": [DrainRequest.model_json_schema(), {"type": "null"}]}}}}}


def add_pool_routes(router: APIRouter, *, name: Callable[[str], str], protected: Sequence[Depends]) -> None:
    """Add the pool routes to *router*; *protected* is the auth dependency list."""
    deps = list(protected)
    auth_errors = error_responses(401, 503)

    @router.get("/stats", response_model=StatsResponse, name=name("stats"), dependencies=deps,
                responses=auth_errors, summary="Pool statistics")
    async def stats(coordinator: CoordinatorDep, scope: Scope = "fleet") -> dict[str, Any]:
        """Counts by state, queues per class/core/worker, latency percentiles, policy stats.

        The top-level figures are this process's. In a fleet, ``fleet`` adds
        the fleet's totals and one row per live member (state, counts,
        throughput, queue and run-time p99, ``snapshot_age``).
        """
        return stats_snapshot(coordinator, scope)

    @router.get("/affinity", response_model=AffinityResponse, name=name("affinity"), dependencies=deps,
                responses=auth_errors, summary="Routing per core and weight class")
    async def affinity(coordinator: CoordinatorDep, scope: Scope = "fleet") -> AffinityResponse:
        """Calls routed to each core per weight class, and each worker's live queue depth.

        In a fleet, ``fleet`` adds the routed counts summed over the members and per member.
        """
        snap = coordinator.stats()
        fleet = fleet_of(coordinator, scope)
        cores = [
            {**{k: core[k] for k in ("core_id", "owners", "routed", "routed_total", "queue_depth",
                                     "busy_workers", "active_workers")},
             "workers": [{k: w[k] for k in ("worker_id", "queue_depth", "busy", "active")}
                         for w in core["workers"]]}
            for core in snap["cores"]
        ]
        return AffinityResponse.model_validate({
            "pid": os.getpid(), "mailbox_size": snap["mailbox_size"], "routed_by_weight": snap["routed_by_weight"],
            "cores": cores, "member": None if fleet is None else fleet.member_id,
            "fleet": None if fleet is None else fleet_affinity(fleet, snap)})

    @router.get("/workers", response_model=list[WorkerInfo], name=name("workers"), dependencies=deps,
                responses=auth_errors, summary="Workers of every lane")
    async def workers(coordinator: CoordinatorDep, scope: Scope = "fleet") -> list[dict[str, Any]]:
        """Every worker of every lane: its core, mailbox depth, whether it is busy and with which operation.

        Thread workers come first (``lane: "thread"``). A process-lane worker
        (``lane: "process"``) also shows its worker process in ``process``:
        pid, resident memory, calls, restarts, crashes, terminations,
        recycles, state and start-up seconds.

        In a fleet, the workers of every live member, each row with its
        ``member`` and the ``age`` of its figures.
        """
        fleet = fleet_of(coordinator, scope)
        if fleet is not None:
            return fleet_workers(fleet, local_stats(coordinator))
        return list(lane_workers(coordinator.stats()))

    @router.get("/history", response_model=list[ExecutionRecord], name=name("history"), dependencies=deps,
                responses=error_responses(401, 422, 503), summary="Recent execution records")
    async def history(coordinator: CoordinatorDep,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                      scope: Scope = "fleet") -> list[dict[str, Any]]:
        """The most recently settled calls, newest first (bounded by the coordinator's history_size).

        ``lane`` is the lane of the worker that ran the call (null for one
        that never reached a worker, e.g. killed while queued).

        In a fleet, every live member's calls merged by ``finished_at``, each
        with its ``member`` and a fleet token id ``<member>-<number>``; other
        members contribute their latest published calls (100 each, at most
        about one heartbeat old).
        """
        rows = with_lanes([record.to_dict() for record in coordinator.history(limit)],
                          worker_lanes(coordinator.stats()))
        fleet = fleet_of(coordinator, scope)
        if fleet is not None:
            return fleet_history(fleet, rows, limit)
        return rows

    @router.get("/tokens/{token_id}", response_model=TokenRecord, name=name("tokens.get"), dependencies=deps,
                responses=error_responses(401, 404, 422, 503), summary="One token's status")
    async def get_token(coordinator: CoordinatorDep, token_id: TokenId) -> dict[str, Any]:
        """A live token's status, or a settled one's history record; 404 when neither exists.

        A fleet token id (``<member>-<number>``) is looked up on that member,
        whichever process received the request (about ``poll_interval`` later).
        """
        member, found = await _remote_token(coordinator, "get_token", token_id)
        if member is not None:
            record = found.get("record") if isinstance(found, dict) else None
        else:
            record = coordinator.find_token_record(found)
            fleet = fleet_of(coordinator)
            member = None if fleet is None else fleet.member_id
        if record is None:
            raise _not_found(token_id)
        out = _token_record(record)
        if member is not None:
            out.update(member=member, token_id=fleet_token_id(member, str(record.get("token_id"))))
        return out

    @router.post("/tokens/{token_id}/kill", response_model=KillResult, name=name("tokens.kill"),
                 dependencies=deps, responses=error_responses(401, 404, 409, 422, 503),
                 summary="Kill a token that has not started, or a running process-lane call")
    async def kill_token(coordinator: CoordinatorDep, token_id: TokenId) -> KillResult:
        """Kill a waiting or queued token: it settles KILLED and its awaiter gets ``TokenKilled``.

        A running call on the process lane is killed too: its worker process
        is ended (and replaced before the next call). A running call on a
        thread cannot be interrupted (threads cannot be stopped safely), so
        it answers 409 ``token_executing``; a settled one answers 409
        ``token_already_settled``.
        """
        member, found = await _remote_token(coordinator, "kill_token", token_id)
        if member is not None:
            outcome: dict[str, Any] = dict(found) if isinstance(found, dict) else {}
            record = outcome.pop("record", None)
        else:
            outcome = coordinator.kill(found).to_dict()
            record = None if outcome["found"] else coordinator.find_token_record(found)
        if outcome.get("killed"):
            return KillResult(**{**outcome, "token_id": token_id, "member": member})
        if outcome.get("found"):  # live but past the point of no return
            code = ErrorCode.TOKEN_EXECUTING if outcome.get("state") == TokenState.EXECUTING.value \
                else ErrorCode.TOKEN_ALREADY_SETTLED
            raise AdminError(409, code, str(outcome.get("message")), token_id=token_id, state=outcome.get("state"))
        if record is None:
            raise _not_found(token_id)
        state = str(record["state"])
        raise AdminError(409, ErrorCode.TOKEN_ALREADY_SETTLED,
                         f"token {token_id} already settled as {state}; only a token that has not started "
                         "can be killed", token_id=token_id, state=state)

    @router.post("/drain", response_model=DrainReport, name=name("drain"), dependencies=deps,
                 responses=error_responses(401, 422, 503), summary="Close the gate and wait for work to finish",
                 openapi_extra=_DRAIN_BODY_SCHEMA)
    async def drain(
        coordinator: CoordinatorDep,
        request: Request,
        wait: Annotated[bool | None, Query(description="Wait for in-flight work (default true).")] = None,
        timeout: Annotated[float | None, Query(ge=0, le=300, description="Seconds to wait (default 30).")] = None,
    ) -> DrainReport:
        """New calls are refused (``GateClosed`` → 503) until ``POST /resume``; readiness turns 503.

        Options come as a JSON body ``{"wait": bool, "timeout": seconds}`` or as
        query parameters (an option in both: the body wins). With ``wait=false``
        it answers at once.

        In a fleet every member drains (at the same time); the report is the
        fleet's (drained only if every member did; sums; the longest), and
        ``fleet`` holds each member's report, or why it did not drain.
        """
        options = DrainRequest()
        if wait is not None:
            options.wait = wait
        if timeout is not None:
            options.timeout = timeout
        body = await _drain_body(request)  # only now: the auth dependency has accepted the caller
        if body is not None:
            options = options.model_copy(update={field: getattr(body, field) for field in body.model_fields_set})
        fleet_report = await control(coordinator, "drain", args={"wait": options.wait, "timeout": options.timeout},
                                     timeout=(options.timeout if options.wait else 0.0) + 2.0, concurrent_local=True)
        if fleet_report is not None:
            return DrainReport(**drain_totals(fleet_report), fleet=FleetControl.model_validate(fleet_report.to_dict()))
        report = await coordinator.drain(options.timeout if options.wait else 0.0)
        return DrainReport(**report.to_dict())

    @router.post("/pause", response_model=PoolState, name=name("pause"), dependencies=deps,
                 responses=auth_errors, summary="Pause admission")
    async def pause(coordinator: CoordinatorDep) -> PoolState:
        """New and pending calls wait (they are not refused); calls already in a mailbox still run.

        In a fleet: on every member, and on members that start while the fleet is paused.
        """
        report = await control(coordinator, "pause")
        if report is None:
            coordinator.pause()
        return _pool_state(coordinator, report)

    @router.post("/resume", response_model=PoolState, name=name("resume"), dependencies=deps,
                 responses=auth_errors, summary="Resume admission and reopen a drained gate")
    async def resume(coordinator: CoordinatorDep) -> PoolState:
        """Lift a global pause and reopen the gate a drain closed (in a fleet: on every member)."""
        report = await control(coordinator, "resume")
        if report is None:
            coordinator.resume()
        return _pool_state(coordinator, report)
