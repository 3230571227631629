"""Admin route about the Dask lane's cluster: ``GET /cluster``.

Part of :func:`tokengate_fastapi.admin_router`; protected by the router's auth
dependency. Always this process's own cluster view: each server process has
its own Dask client (in a fleet, ``member`` names the process that answered).
"""

import os
from typing import Callable, Sequence

from fastapi import APIRouter
from fastapi.params import Depends

from .dependencies import CoordinatorDep
from .fleet import fleet_of
from .schemas import ClusterInfo, ClusterResponse, error_responses

__all__ = ["add_cluster_routes"]


def add_cluster_routes(router: APIRouter, *, name: Callable[[str], str], protected: Sequence[Depends]) -> None:
    """Add ``GET /cluster`` (protected by *protected*)."""

    @router.get("/cluster", response_model=ClusterResponse, name=name("cluster"), dependencies=list(protected),
                responses=error_responses(401, 503), summary="The Dask lane's cluster")
    async def cluster(coordinator: CoordinatorDep) -> ClusterResponse:
        """The Dask lane's cluster: connection state, scheduler address, workers with their resources,
        calls in flight per weight class, the Dask dashboard link, counts.

        ``enabled`` is false (and ``cluster`` null) on a coordinator without a
        Dask lane (an unconfigured lane appears at its first call).
        """
        info = coordinator.cluster()
        fleet = fleet_of(coordinator)
        return ClusterResponse(pid=os.getpid(), enabled=info is not None,
                               cluster=None if info is None else ClusterInfo.model_validate(info),
                               member=None if fleet is None else fleet.member_id)
