"""``get_coordinator``: the FastAPI dependency that hands endpoints the app's coordinator.

Use the ``Annotated`` alias in an endpoint's signature::

    @app.get("/pool")
    async def pool(coordinator: CoordinatorDep) -> dict[str, int]:
        return {"inflight": coordinator.inflight}

Tests swap the coordinator with ``app.dependency_overrides[get_coordinator]``.
"""

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from tokengate import OperationsCoordinator
from tokengate.errors import CoordinatorNotRunning

__all__ = ["get_coordinator", "CoordinatorDep", "STATE_KEY", "MISSING_MESSAGE"]

#: The lifespan-state key (and ``app.state`` attribute) holding the coordinator.
STATE_KEY = "tokengate"

MISSING_MESSAGE = (
    "tokengate coordinator not found; did you pass lifespan=tokengate_lifespan() to FastAPI()? "
    "(inside your own lifespan, yield the state of `async with tokengate_lifespan()(app) as state`)"
)


async def get_coordinator(connection: HTTPConnection) -> OperationsCoordinator:
    """Return the coordinator that :func:`~tokengate_fastapi.tokengate_lifespan` started for this app.

    Looks in the request's lifespan state first, then in ``app.state`` (set
    too, for code that has only the app). ``async def`` on purpose: a sync
    dependency would run on the shared thread pool this library exists to
    keep free.

    Raises:
        CoordinatorNotRunning: when no lifespan put a coordinator there (the
            message says how to fix it). With the handlers of
            :func:`~tokengate_fastapi.add_exception_handlers` it answers 503.

    Thread: the server's event loop.
    """
    coordinator = getattr(connection.state, STATE_KEY, None)
    if coordinator is None:
        coordinator = getattr(connection.app.state, STATE_KEY, None)
    if not isinstance(coordinator, OperationsCoordinator):
        raise CoordinatorNotRunning(MISSING_MESSAGE)
    return coordinator


#: ``coordinator: CoordinatorDep`` in an endpoint's signature injects the app's coordinator.
CoordinatorDep = Annotated[OperationsCoordinator, Depends(get_coordinator)]
