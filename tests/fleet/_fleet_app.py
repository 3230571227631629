"""The app the multi-process fleet test serves with ``uvicorn --workers 2`` (import string ``fleet._fleet_app:app``).

Small on purpose (one domain, two threads, no worker processes) so two
server processes start in a second. Every answer says which process served
it in ``X-Pid``. The fleet directory, quarantine file and admin token come
from the environment the test sets (``TOKENGATE_FLEET_DIR``,
``FLEET_TEST_QUARANTINE``, ``TOKENGATE_ADMIN_TOKEN``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request, Response

from tokengate import OperationsCoordinator, task_token_guard
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate_fastapi import add_exception_handlers, admin_router, tokengate_lifespan


@task_token_guard(operation_type="fleet.work", tags={"weight": "light"})
def work(x: int) -> int:
    return x + 1


@task_token_guard(operation_type="fleet.slow", tags={"weight": "light"})
def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _coordinator() -> OperationsCoordinator:
    return OperationsCoordinator(num_cores=1, workers_per_core=2, process_workers=0, name="fleetsrv",
                                 # Two server processes write one quarantine file: on a loaded CI host a
                                 # write can take longer than the 2 s default, and the call would then be
                                 # admitted (the documented fail-open), not quarantined as the test expects.
                                 policies=[QuarantinePolicy(os.environ["FLEET_TEST_QUARANTINE"],
                                                            write_timeout=30)])


app = FastAPI(lifespan=tokengate_lifespan(coordinator_factory=_coordinator, drain_timeout=2))
add_exception_handlers(app)
app.include_router(admin_router(), prefix="/tokengate")


@app.middleware("http")
async def say_pid(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    response.headers["X-Pid"] = str(os.getpid())
    return response


@app.get("/work/{x}")
async def run_work(x: int) -> dict[str, Any]:
    return {"value": await work(x), "pid": os.getpid()}


@app.get("/slow")
async def run_slow(seconds: float = 5.0) -> dict[str, Any]:
    return {"value": await slow(seconds), "pid": os.getpid()}
