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

from ._lanes import label_thread_workers, lane_workers, with_lanes, worker_lanes
from .dependencies import CoordinatorDep
from .errors import AdminError, ErrorCode
from .schemas import (
    AffinityResponse,
    DrainReport,
    DrainRequest,
    ExecutionRecord,
    KillResult,
    PoolState,
    StatsResponse,
    TokenRecord,
    WorkerInfo,
    error_responses,
)

__all__ = ["add_pool_routes", "stats_snapshot"]

TokenId = Annotated[str, Path(pattern=r"^[0-9]{1,20}$", description="A token id (digits), as in /history.")]


def stats_snapshot(coordinator: OperationsCoordinator) -> dict[str, Any]:
    """``coordinator.stats()`` plus this process's ``pid``; every worker row says its ``lane``."""
    return {**label_thread_workers(coordinator.stats()), "pid": os.getpid()}


def _pool_state(coordinator: OperationsCoordinator) -> PoolState:
    stats = coordinator.stats()
    return PoolState(pid=os.getpid(), phase=stats["phase"], paused=stats["paused"], draining=stats["draining"],
                     inflight=stats["counts"]["inflight"])


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
    async def stats(coordinator: CoordinatorDep) -> dict[str, Any]:
        """Counts by state, queues per class/core/worker, latency percentiles, policy stats."""
        return stats_snapshot(coordinator)

    @router.get("/affinity", response_model=AffinityResponse, name=name("affinity"), dependencies=deps,
                responses=auth_errors, summary="Routing per core and weight class")
    async def affinity(coordinator: CoordinatorDep) -> AffinityResponse:
        """Calls routed to each core per weight class, and each worker's live queue depth."""
        snap = coordinator.stats()
        cores = [
            {**{k: core[k] for k in ("core_id", "owners", "routed", "routed_total", "queue_depth",
                                     "busy_workers", "active_workers")},
             "workers": [{k: w[k] for k in ("worker_id", "queue_depth", "busy", "active")}
                         for w in core["workers"]]}
            for core in snap["cores"]
        ]
        return AffinityResponse.model_validate({"pid": os.getpid(), "mailbox_size": snap["mailbox_size"],
                                                "routed_by_weight": snap["routed_by_weight"], "cores": cores})

    @router.get("/workers", response_model=list[WorkerInfo], name=name("workers"), dependencies=deps,
                responses=auth_errors, summary="Workers of every lane")
    async def workers(coordinator: CoordinatorDep) -> list[dict[str, Any]]:
        """Every worker of every lane: its core, mailbox depth, whether it is busy and with which operation.

        Thread workers come first (``lane: "thread"``). A process-lane worker
        (``lane: "process"``) also shows its worker process in ``process``:
        pid, resident memory, calls, restarts, crashes, terminations,
        recycles, state and start-up seconds.
        """
        return list(lane_workers(coordinator.stats()))

    @router.get("/history", response_model=list[ExecutionRecord], name=name("history"), dependencies=deps,
                responses=error_responses(401, 422, 503), summary="Recent execution records")
    async def history(coordinator: CoordinatorDep,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        """The most recently settled calls, newest first (bounded by the coordinator's history_size).

        ``lane`` is the lane of the worker that ran the call (null for one
        that never reached a worker, e.g. killed while queued).
        """
        return with_lanes([record.to_dict() for record in coordinator.history(limit)],
                          worker_lanes(coordinator.stats()))

    @router.get("/tokens/{token_id}", response_model=TokenRecord, name=name("tokens.get"), dependencies=deps,
                responses=error_responses(401, 404, 422, 503), summary="One token's status")
    async def get_token(coordinator: CoordinatorDep, token_id: TokenId) -> dict[str, Any]:
        """A live token's status, or a settled one's history record; 404 when neither exists."""
        record = coordinator.find_token_record(token_id)
        if record is None:
            raise AdminError(404, ErrorCode.TOKEN_NOT_FOUND,
                             f"no token {token_id!r}: unknown, or settled too long ago to be in the history",
                             token_id=token_id)
        return _token_record(record)

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
        result = coordinator.kill(token_id)
        if result.killed:
            return KillResult(**result.to_dict())
        if result.found:  # live but past the point of no return
            code = ErrorCode.TOKEN_EXECUTING if result.state == TokenState.EXECUTING.value \
                else ErrorCode.TOKEN_ALREADY_SETTLED
            raise AdminError(409, code, result.message, token_id=token_id, state=result.state)
        record = coordinator.find_token_record(token_id)
        if record is None:
            raise AdminError(404, ErrorCode.TOKEN_NOT_FOUND,
                             f"no token {token_id!r}: unknown, or settled too long ago to be in the history",
                             token_id=token_id)
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
        """
        options = DrainRequest()
        if wait is not None:
            options.wait = wait
        if timeout is not None:
            options.timeout = timeout
        body = await _drain_body(request)  # only now: the auth dependency has accepted the caller
        if body is not None:
            options = options.model_copy(update={field: getattr(body, field) for field in body.model_fields_set})
        report = await coordinator.drain(options.timeout if options.wait else 0.0)
        return DrainReport(**report.to_dict())

    @router.post("/pause", response_model=PoolState, name=name("pause"), dependencies=deps,
                 responses=auth_errors, summary="Pause admission")
    async def pause(coordinator: CoordinatorDep) -> PoolState:
        """New and pending calls wait (they are not refused); calls already in a mailbox still run."""
        coordinator.pause()
        return _pool_state(coordinator)

    @router.post("/resume", response_model=PoolState, name=name("resume"), dependencies=deps,
                 responses=auth_errors, summary="Resume admission and reopen a drained gate")
    async def resume(coordinator: CoordinatorDep) -> PoolState:
        """Lift a global pause and reopen the gate a drain closed."""
        coordinator.resume()
        return _pool_state(coordinator)
