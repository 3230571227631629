"""Admin routes about operations (pause, block, hold, kill) and the quarantine.

Part of :func:`tokengate_fastapi.admin_router`. Reputation and quarantine come
from optional policies (see :mod:`tokengate_fastapi._policies`): listing
routes answer ``[]`` without them, routes that act on one answer 404
``policy_not_installed``.
"""

import asyncio
from typing import Annotated, Any, Callable, Literal, Sequence

from fastapi import APIRouter, Path, Query
from fastapi.params import Depends

from tokengate import OperationsCoordinator
from tokengate.fleet import CommandReport

from .dependencies import CoordinatorDep
from .errors import AdminError, ErrorCode
from .fleet import Scope, applied_results, control, fleet_of, fleet_operations
from .schemas import (
    FleetControl,
    OperationKillResult,
    OperationReputation,
    OperationState,
    QuarantineRecord,
    QuarantineReleaseResult,
    error_responses,
)
from ._lanes import operation_lanes, worker_lanes
from ._policies import find_quarantine, operation_rows, operation_state, quarantine_policy, reputation_policy

__all__ = ["add_operation_routes"]


OperationType = Annotated[str, Path(min_length=1, max_length=300, description="An operation type.")]
QuarantineId = Annotated[str, Path(min_length=1, max_length=200, description="A quarantine record id.")]
#: The largest page offset: a store keeps it as a 64-bit integer (SQLite's INTEGER); beyond it is a 422, not a 500.
MAX_OFFSET = 2**63 - 1


def _consume_outcome(token: "asyncio.Future[Any]") -> None:
    # Nobody awaits a released call: read its outcome so asyncio does not log
    # "exception was never retrieved"; the policy records the outcome itself.
    if not token.cancelled():
        token.exception()


def _not_found(quarantine_id: str) -> AdminError:
    return AdminError(404, ErrorCode.QUARANTINE_NOT_FOUND, f"no quarantine record {quarantine_id!r}",
                      quarantine_id=quarantine_id)


def _with_fleet(state: dict[str, Any], report: CommandReport | None) -> dict[str, Any]:
    return state if report is None else {**state, "fleet": FleetControl.model_validate(report.to_dict())}


async def _operation_control(coordinator: OperationsCoordinator, action: str, operation_type: str,
                             local: Callable[[], Any]) -> dict[str, Any]:
    """Apply an operation action on every member of the fleet, or here only (*local*) without a fleet."""
    report = await control(coordinator, action, operation_type)
    if report is None:
        local()
    return _with_fleet(operation_state(coordinator, operation_type), report)


def add_operation_routes(router: APIRouter, *, name: Callable[[str], str], protected: Sequence[Depends]) -> None:
    """Add the operation and quarantine routes to *router*; *protected* is the auth dependency list."""
    deps = list(protected)
    auth_errors = error_responses(401, 422, 503)
    policy_errors = error_responses(401, 404, 422, 500, 503)

    @router.get("/operations", response_model=list[OperationReputation], name=name("operations.list"),
                dependencies=deps, responses=error_responses(401, 500, 503), summary="Reputation per operation")
    async def list_operations(coordinator: CoordinatorDep, scope: Scope = "fleet") -> list[dict[str, Any]]:
        """Reputation rows (when the reputation policy is installed) with paused/held/blocked flags and lane.

        ``lane`` is the lane (thread or process) the operation's most recent
        call in the execution history ran on. In a fleet, one row per
        operation over every live member (attempts, successes and failures
        summed; a flag set on any member; the worst health), with each
        member's own row in ``members``.
        """
        stats = coordinator.stats()
        rows = operation_rows(coordinator, stats["paused_operations"],
                              operation_lanes(coordinator, worker_lanes(stats)))
        fleet = fleet_of(coordinator, scope)
        return rows if fleet is None else fleet_operations(fleet, rows)

    @router.post("/operations/{operation_type:path}/pause", response_model=OperationState,
                 name=name("operations.pause"), dependencies=deps, responses=auth_errors,
                 summary="Pause one operation")
    async def pause_operation(coordinator: CoordinatorDep, operation_type: OperationType) -> dict[str, Any]:
        """New calls of this operation wait until resumed (they are held, not refused). In a fleet: every member."""
        return await _operation_control(coordinator, "pause_operation", operation_type,
                                        lambda: coordinator.pause(operation_type))

    @router.post("/operations/{operation_type:path}/resume", response_model=OperationState,
                 name=name("operations.resume"), dependencies=deps, responses=auth_errors,
                 summary="Resume one operation")
    async def resume_operation(coordinator: CoordinatorDep, operation_type: OperationType) -> dict[str, Any]:
        """Release the calls held by a pause of this operation (in a fleet: on every member)."""
        return await _operation_control(coordinator, "resume_operation", operation_type,
                                        lambda: coordinator.resume(operation_type))

    @router.post("/operations/{operation_type:path}/unblock", response_model=OperationState,
                 name=name("operations.unblock"), dependencies=deps, responses=policy_errors,
                 summary="Lift a reputation block")
    async def unblock_operation(coordinator: CoordinatorDep, operation_type: OperationType) -> dict[str, Any]:
        """Lift the reputation policy's automatic block of this operation (in a fleet: on every member)."""
        reputation = reputation_policy(coordinator)
        return await _operation_control(coordinator, "unblock", operation_type,
                                        lambda: reputation.unblock(operation_type))

    @router.post("/operations/{operation_type:path}/hold", response_model=OperationState,
                 name=name("operations.hold"), dependencies=deps, responses=policy_errors,
                 summary="Quarantine every new call of an operation")
    async def hold_operation(coordinator: CoordinatorDep, operation_type: OperationType) -> dict[str, Any]:
        """New calls of this operation go to the quarantine for review instead of running.

        In a fleet: on every member, and on members that start while it is held.
        """
        quarantine = quarantine_policy(coordinator)
        return await _operation_control(coordinator, "hold", operation_type,
                                        lambda: quarantine.hold(operation_type))

    @router.post("/operations/{operation_type:path}/unhold", response_model=OperationState,
                 name=name("operations.unhold"), dependencies=deps, responses=policy_errors,
                 summary="Stop quarantining an operation")
    async def unhold_operation(coordinator: CoordinatorDep, operation_type: OperationType) -> dict[str, Any]:
        """New calls of this operation run again (records already held stay in the quarantine). Fleet: every member."""
        quarantine = quarantine_policy(coordinator)
        return await _operation_control(coordinator, "unhold", operation_type,
                                        lambda: quarantine.unhold(operation_type))

    @router.post("/operations/{operation_type:path}/kill", response_model=OperationKillResult,
                 name=name("operations.kill"), dependencies=deps, responses=auth_errors,
                 summary="Kill every not-yet-started call of an operation")
    async def kill_operation(coordinator: CoordinatorDep, operation_type: OperationType) -> OperationKillResult:
        """Waiting and queued calls settle KILLED; running ones finish (threads cannot be interrupted).

        In a fleet: on every member; ``killed`` is the fleet's total.
        """
        report = await control(coordinator, "kill_operation", operation_type)
        if report is None:
            return OperationKillResult(operation_type=operation_type,
                                       killed=coordinator.kill_operation(operation_type))
        killed = sum(int(r.get("killed") or 0) for r in applied_results(report) if isinstance(r, dict))
        return OperationKillResult(operation_type=operation_type, killed=killed,
                                   fleet=FleetControl.model_validate(report.to_dict()))

    @router.get("/quarantine", response_model=list[QuarantineRecord], name=name("quarantine.list"),
                dependencies=deps, responses=error_responses(401, 422, 500, 503), summary="Quarantined calls")
    async def list_quarantine(
        coordinator: CoordinatorDep,
        status: Annotated[Literal["pending", "released", "discarded"] | None, Query()] = None,
        operation: Annotated[str | None, Query(min_length=1, max_length=300)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> list[dict[str, Any]]:
        """Records newest first, filtered by status and operation type; ``[]`` without the policy."""
        quarantine = find_quarantine(coordinator)
        if quarantine is None:
            return []
        return quarantine.list(status=status, operation_type=operation, limit=limit, offset=offset)

    @router.get("/quarantine/{quarantine_id}", response_model=QuarantineRecord, name=name("quarantine.get"),
                dependencies=deps, responses=policy_errors, summary="One quarantined call")
    async def get_quarantine(coordinator: CoordinatorDep, quarantine_id: QuarantineId) -> dict[str, Any]:
        """One record (argument summaries only, never the stored payload)."""
        quarantine = quarantine_policy(coordinator)
        record = quarantine.get(quarantine_id)
        if record is None:
            raise _not_found(quarantine_id)
        return record

    @router.post("/quarantine/{quarantine_id}/release", response_model=QuarantineReleaseResult,
                 name=name("quarantine.release"), dependencies=deps,
                 responses=error_responses(401, 404, 409, 422, 500, 503),
                 summary="Re-run a quarantined call")
    async def release_quarantine(
        coordinator: CoordinatorDep,
        quarantine_id: QuarantineId,
        force: Annotated[bool, Query(description="take over a release claim held by another process "
                                                 "(only when that process is known to be gone)")] = False,
    ) -> dict[str, Any]:
        """Submit the held call again as a new token and answer at once (no waiting for its outcome).

        409 ``quarantine_conflict`` when it is not pending (released, discarded, being released here
        or by another process sharing the database) or cannot be replayed.
        """
        quarantine = quarantine_policy(coordinator)
        try:
            # On a thread: the claim is a database write, which may wait for another process's lock.
            token = await asyncio.to_thread(quarantine.release, quarantine_id, force=force)
        except KeyError:
            raise _not_found(quarantine_id) from None
        except ValueError as exc:  # includes QuarantineStateError: not pending any more
            raise AdminError(409, ErrorCode.QUARANTINE_CONFLICT, str(exc), quarantine_id=quarantine_id) from None
        if isinstance(token, asyncio.Future):
            token.add_done_callback(_consume_outcome)
        record = quarantine.get(quarantine_id) or {"id": quarantine_id, "status": "released",
                                                   "operation_type": str(getattr(token, "operation_type", ""))}
        return {"record": record, "token_id": str(getattr(token, "token_id", ""))}

    @router.delete("/quarantine/{quarantine_id}", response_model=QuarantineRecord,
                   name=name("quarantine.discard"), dependencies=deps,
                   responses=error_responses(401, 404, 409, 422, 500, 503), summary="Discard a quarantined call")
    async def discard_quarantine(coordinator: CoordinatorDep, quarantine_id: QuarantineId) -> dict[str, Any]:
        """Mark the record discarded: the call will never run. 409 when it is not pending."""
        quarantine = quarantine_policy(coordinator)
        try:
            # On a thread: a database write, which may wait for another process's lock.
            return await asyncio.to_thread(quarantine.discard, quarantine_id)
        except KeyError:
            raise _not_found(quarantine_id) from None
        except ValueError as exc:
            raise AdminError(409, ErrorCode.QUARANTINE_CONFLICT, str(exc), quarantine_id=quarantine_id) from None
