"""Admin route about the fleet itself: ``GET /fleet`` (members, departed members, standing state, settings).

Part of :func:`tokengate_fastapi.admin_router`; see :mod:`tokengate_fastapi.fleet`
for what fleet mode changes in the other routes.
"""

from typing import Any, Callable, Sequence

from fastapi import APIRouter
from fastapi.params import Depends

from .dependencies import CoordinatorDep
from .fleet import fleet_info
from .schemas import FleetInfo, error_responses

__all__ = ["add_fleet_routes"]


def add_fleet_routes(router: APIRouter, *, name: Callable[[str], str], protected: Sequence[Depends]) -> None:
    """Add ``GET /fleet`` to *router*; *protected* is the auth dependency list."""

    @router.get("/fleet", response_model=FleetInfo, name=name("fleet"), dependencies=list(protected),
                responses=error_responses(401, 503), summary="Fleet membership and standing state")
    async def fleet(coordinator: CoordinatorDep) -> dict[str, Any]:
        """Every live member (pid, host, version, heartbeat and snapshot ages, stuck loop), members that left
        or died recently (and why), the fleet's standing state (paused, draining, paused and held
        operations: what a new member starts in), the retired counters, and the settings.

        ``enabled: false`` when no fleet is configured (``fleet_dir`` or ``TOKENGATE_FLEET_DIR``).
        """
        return fleet_info(coordinator)
