"""The app the browser test serves with uvicorn: the admin router plus two endpoints that make work.

Started in a subprocess by ``conftest.py`` (``uvicorn _dash_app:app --app-dir tests/browser``);
not collected by pytest.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI

from tokengate import task_token_guard
from tokengate.errors import TokenQuarantined, WorkerCrashed
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.policies.reputation import ReputationPolicy
from tokengate_fastapi import admin_router, tokengate_lifespan

import _dash_work

# Set by conftest.py, which starts this app.
ADMIN_TOKEN = os.environ["DASH_ADMIN_TOKEN"]
PREFIX = os.environ["DASH_PREFIX"]
# An exception class whose *name* is markup: the history table shows error class names,
# so this checks that the page renders server strings as text, never as HTML.
_Hostile = type(os.environ["DASH_XSS_MARKUP"], (RuntimeError,), {})


@task_token_guard(operation_type="dash_square", tags={"weight": "light"})
def square(x: int) -> int:
    """Trivial light work whose completions the dashboard counts."""
    return x * x


@task_token_guard(operation_type="dash_hostile", tags={"weight": "light"})
def hostile() -> None:
    """Always fails with an exception whose class name is an HTML tag."""
    raise _Hostile("boom")


@task_token_guard(operation_type="dash_held", tags={"weight": "light"})
def held(x: int) -> int:
    """Light work the test puts on hold, so its calls land in the quarantine."""
    return x + 1


app = FastAPI(lifespan=tokengate_lifespan(
    num_cores=2, workers_per_core=2, process_workers=2,  # one worker process per domain, started warm
    policies=[ReputationPolicy(), QuarantinePolicy(":memory:")],
))
app.include_router(admin_router(token=ADMIN_TOKEN), prefix=PREFIX)


@app.post("/work")
async def work(n: int = 10) -> dict[str, int]:
    """Run *n* light calls and answer once all of them completed."""
    results = await asyncio.gather(*(square(i) for i in range(n)))
    return {"done": len(results)}


@app.post("/hostile")
async def make_hostile() -> dict[str, bool]:
    """Run one call that fails with the markup-named exception."""
    try:
        await hostile()
    except RuntimeError:
        return {"failed": True}
    return {"failed": False}


@app.post("/held")
async def make_held(x: int) -> dict[str, str | None]:
    """Call ``held(x)``; answer the quarantine id when the call was quarantined, else None."""
    try:
        await held(x)
    except TokenQuarantined as exc:
        return {"quarantine_id": exc.quarantine_id}
    return {"quarantine_id": None}


@app.post("/pid")
async def pid() -> dict[str, int]:
    """Run one process-lane call; answer the pid of the worker process that ran it."""
    return {"pid": await _dash_work.worker_pid()}


@app.post("/crash")
async def crash() -> dict[str, int | None]:
    """Run a process-lane call that ends its worker process; answer the dead process's pid."""
    try:
        await _dash_work.crash()
    except WorkerCrashed as exc:
        return {"crashed_pid": exc.pid}
    raise AssertionError("crash() returned")
