"""tokengate_fastapi: run a tokengate coordinator inside a FastAPI app, and operate it over HTTP.

The whole integration in five lines::

    app = FastAPI(lifespan=tokengate_lifespan())          # start on the server's loop, drain at shutdown
    app.add_middleware(CancelOnDisconnectMiddleware)       # a client that leaves kills its queued call
    add_exception_handlers(app)                            # Overloaded -> 503 + Retry-After, etc.
    app.include_router(admin_router(), prefix="/tokengate")  # authenticated admin API + dashboard

    @app.get("/thumb")
    async def thumb(coordinator: CoordinatorDep) -> Response: ...

Only tokengate's public API is used; the core never imports FastAPI.
"""

from .admin import admin_router
from .auth import ENV_VAR as ADMIN_TOKEN_ENV_VAR
from .dependencies import CoordinatorDep, get_coordinator
from .disconnect import CancelOnDisconnectMiddleware
from .errors import ErrorCode, add_exception_handlers, error_response, tokengate_exception_handler
from .lifespan import TokengateLifespan, TokengateState, tokengate_lifespan
from .metrics import TokengateCollector
from .schemas import tokengate_responses

__all__ = [
    "ADMIN_TOKEN_ENV_VAR",
    "CancelOnDisconnectMiddleware",
    "CoordinatorDep",
    "ErrorCode",
    "TokengateCollector",
    "TokengateLifespan",
    "TokengateState",
    "add_exception_handlers",
    "admin_router",
    "error_response",
    "get_coordinator",
    "tokengate_exception_handler",
    "tokengate_lifespan",
    "tokengate_responses",
]
