"""The example FastAPI app: every endpoint is ``async def`` and awaits blocking work run by tokengate.

Build it with :func:`create_app`; ``python -m example_app`` serves it with
uvicorn on 127.0.0.1:8000 (see ``example_app/README.md`` for a curl tour).
``uvicorn example_app.app:app`` works too: the module attribute ``app`` is
built on first access (never at import), with the admin token taken from
``$TOKENGATE_ADMIN_TOKEN``.

What is wired, in the order a call meets it:

* ``tokengate_lifespan``: a coordinator with 4 worker domains x 4 threads
  and 4 worker processes (one per domain) for the process lane, started on
  the server's loop (the processes warm, off the request path: ``/ready`` is
  503 until they are up), drained (10 s) and stopped at shutdown;
* policies: reputation (auto-block) → quarantine → sticky → conductor →
  convergence → storage tiers → retries;
* ``CancelOnDisconnectMiddleware``: a client that leaves kills its queued call;
* ``add_exception_handlers``: refusals become 503/409/504 JSON answers, a
  worker process that dies under its call a 502 ``worker_crashed``, and
  malformed input a 422 ``invalid_argument`` in the same body shape;
* ``admin_router`` under ``/tokengate``: the authenticated admin API and dashboard.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt

from tokengate import OperationsCoordinator, Policy, TaskToken
from tokengate.convergence import ConvergencePolicy
from tokengate.policies.conductor import ConductorPolicy
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.policies.reputation import ReputationPolicy
from tokengate.policies.retries import RetryPolicy
from tokengate.policies.sticky import StickyPolicy
from tokengate.policies.tiers import StorageTierPolicy
from tokengate_fastapi import (
    CancelOnDisconnectMiddleware,
    CoordinatorDep,
    add_exception_handlers,
    admin_router,
    tokengate_lifespan,
    tokengate_responses,
)
from tokengate_fastapi.errors import ErrorCode, http_exception_handler, request_validation_exception_handler

from . import work

__all__ = ["create_app", "make_policies", "ADMIN_PREFIX", "DEFAULT_QUARANTINE_PATH", "DEFAULT_FLEET_DIR",
           "QUARANTINE_ENV_VAR", "NUM_CORES",
           "WORKERS_PER_CORE", "PROCESS_WORKERS"]

ADMIN_PREFIX = "/tokengate"
DEFAULT_QUARANTINE_PATH = "example-quarantine.sqlite3"
#: The fleet directory of ``python -m example_app --workers N`` (relative to the working directory).
DEFAULT_FLEET_DIR = "example-fleet"
#: The quarantine file of ``uvicorn example_app.app:app`` (``python -m example_app --workers N`` sets it).
QUARANTINE_ENV_VAR = "TOKENGATE_EXAMPLE_QUARANTINE_DB"
#: Fixed so the demo routes the same way on every machine ("cores" are worker domains, not CPU pins).
NUM_CORES = 4
WORKERS_PER_CORE = 4
#: Worker processes of the process lane: one per domain (the fewest it can have), so ~4 x 30 MB of RSS.
PROCESS_WORKERS = NUM_CORES
#: Bounds of /cpu's n: about 0.1 ms to 50 ms of pure-Python work on this project's 2-vCPU test machine.
CPU_MAX_N = 600_000
DRAIN_TIMEOUT = 10.0
SLOW_TIER_LIMIT = 2
#: What a route that awaits tokens can answer besides 200 (refusals, timeouts, malformed input):
#: documented so the OpenAPI schema is the real contract (tests/fastapi/test_fastapi_contract_fuzz.py checks it).
TOKEN_ERRORS = tokengate_responses()
#: /fail and /flaky also answer their function's exception themselves: 500 function_failed.
FAILING_ERRORS = tokengate_responses(function_failed=True)
#: Routes whose calls run on the process lane also answer 502 worker_crashed (and the lane's 500/503s).
PROCESS_ERRORS = tokengate_responses(process_lane=True)


def make_policies(quarantine_path: str) -> list[Policy]:
    """Fresh policy objects for one coordinator, tuned so each demo trips within a few requests."""
    return [
        # First: a blocked operation is refused before anything else looks at it.
        # 5 failures of the last 10 attempts at >= 90 % block (the default needs 10).
        # ValueError is the caller's fault (bad input), not the operation's: it never blocks one.
        ReputationPolicy(auto_block=True, block_window=10, block_min_attempts=5, ignore=ValueError),
        # Spikes are judged after 5 calls of an operation; a call is a spike above
        # 8x the recent p99 argument size and above 16 KiB. poison_failures=4 (default 3)
        # because a retry is re-admitted like a new call: with 3, /flaky?fail_times=3
        # would have its 4th attempt quarantined as poison instead of run.
        QuarantinePolicy(quarantine_path, spike_min_samples=5, spike_min_bytes=16 * 1024, poison_failures=4),
        StickyPolicy(),
        ConductorPolicy(),
        # Trims idle domains to 2 active workers and grows them back under a backlog.
        ConvergencePolicy(interval=1.0, min_active=2),
        # Last: a slot or a retry is only taken for a call every other policy let through.
        StorageTierPolicy(limits={"slow": SLOW_TIER_LIMIT}),
        RetryPolicy(),
    ]


def describe(token: TaskToken[Any]) -> dict[str, Any]:
    """Where and how a call ran, read from its token (after it was awaited)."""
    return {
        "token_id": token.token_id,
        "operation_type": token.operation_type,
        "state": token.state.value,
        "weight": token.weight,
        "core_id": token.core_id,
        "worker_id": token.worker_id,
        "attempt": token.attempt,
        "queue_wait_ms": _ms(token.queue_wait),
        "run_time_ms": _ms(token.run_time),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _failed(token: TaskToken[Any], exc: Exception) -> JSONResponse:
    # The function's own exception: answer with the same body shape as tokengate's refusals.
    return JSONResponse({"error": ErrorCode.FUNCTION_FAILED.value, "exception": type(exc).__name__,
                         "detail": str(exc), **describe(token)}, status_code=500)


def _retrieve_outcome(token: asyncio.Future[Any]) -> None:
    # A background job nobody awaits: read its outcome so asyncio never logs it as unretrieved.
    if not token.cancelled():
        token.exception()


class Batch(BaseModel):
    """The body of ``POST /process``."""

    # Strict: JSON true/false or "3" are not numbers (lax pydantic would read them as 1/0 and 3).
    items: list[StrictInt] = Field(max_length=1_000_000, description="Numbers to summarise (JSON integers).")


ENDPOINTS: list[dict[str, str]] = [
    {"route": "GET /light?n=20000", "shows": "light CPU work on the light domains (4, 3)"},
    {"route": "GET /medium?rounds=20000", "shows": "medium work on domains 2..4"},
    {"route": "GET /heavy?ms=500", "shows": "a blocking sleep (<= 2000 ms) on the heavy domains (1 first)"},
    {"route": "GET /io?kb=64&ms=200", "shows": f"storage tier 'slow': at most {SLOW_TIER_LIMIT} at once"},
    {"route": "GET /sticky/{user_id}?calls=4", "shows": "overlapping calls for one user share a domain"},
    {"route": "GET /ordered/{account}?calls=5", "shows": "one account's calls run one at a time, in order"},
    {"route": "GET /chain?parts=4", "shows": "a conductor lead and its children on one domain"},
    {"route": "POST /process {\"items\": [...]}", "shows": "a batch far bigger than usual is quarantined (409)"},
    {"route": "GET /flaky?fail_times=2", "shows": "retried on the same token until it succeeds"},
    {"route": "GET /fail", "shows": "always fails (500); after 5 failures auto-blocked (503)"},
    {"route": "GET /slow?seconds=3", "shows": "a slow heavy call (<= 30 s)"},
    {"route": "POST /jobs/slow?seconds=3", "shows": "submit without waiting (202 + token_id)"},
    {"route": "GET /cpu?n=200000", "shows": "pure-Python CPU work in a worker process (the process lane)"},
    {"route": "GET /crash", "shows": "the worker process dies: 502 worker_crashed, and the next request works"},
]


def create_app(admin_token: str | None = None, quarantine_path: str | None = None,
               drain_timeout: float = DRAIN_TIMEOUT, fleet_dir: str | None = None) -> FastAPI:
    """Build the example app (nothing starts until the server runs its lifespan).

    Args:
        admin_token: The admin API's bearer token. ``None`` reads
            ``$TOKENGATE_ADMIN_TOKEN`` now; with neither, the protected admin
            routes answer 503 (they fail closed).
        quarantine_path: The quarantine's SQLite file. ``None`` means
            ``example-quarantine.sqlite3`` in the current directory (made
            absolute now). ``":memory:"`` keeps records in this process only.
        drain_timeout: Seconds the shutdown waits for accepted calls (default
            10) before stopping the coordinator; see ``example_app/serve.py``
            for the order of a shutdown.
        fleet_dir: The fleet directory shared by the app's server processes
            (``uvicorn --workers N``). ``None`` reads ``$TOKENGATE_FLEET_DIR``
            when the server starts; with neither, no fleet.
    """
    path = quarantine_path or DEFAULT_QUARANTINE_PATH
    if path != ":memory:":
        path = os.path.abspath(path)

    def new_coordinator() -> OperationsCoordinator:
        # A factory, so every server start gets fresh policies (a stopped coordinator cannot restart).
        # warm_processes: the worker processes start with the server, not on the first /cpu request.
        return OperationsCoordinator(num_cores=NUM_CORES, workers_per_core=WORKERS_PER_CORE,
                                     process_workers=PROCESS_WORKERS, warm_processes=True,
                                     policies=make_policies(path), name="example", fleet_dir=fleet_dir)

    app = FastAPI(title="TokenGate example", version="0.1.0",
                  lifespan=tokengate_lifespan(coordinator_factory=new_coordinator, drain_timeout=drain_timeout))
    app.add_middleware(CancelOnDisconnectMiddleware)
    add_exception_handlers(app)
    # The admin routes answer malformed input this way by themselves; the app's endpoints too.
    app.add_exception_handler(RequestValidationError, request_validation_exception_handler)
    # An unknown path or method gets the same body too (404 not_found, 405 method_not_allowed).
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    app.include_router(admin_router(token=admin_token), prefix=ADMIN_PREFIX)
    request_numbers = itertools.count(1)  # per app: /fail passes a fresh number to every call

    @app.get("/", responses={503: TOKEN_ERRORS[503]})  # coordinator_not_running
    async def index(coordinator: CoordinatorDep) -> dict[str, Any]:
        """What this app serves, and where the admin API and the dashboard are."""
        return {
            "app": "TokenGate example",
            "coordinator": {"name": coordinator.name, "cores": coordinator.num_cores,
                            "workers_per_core": coordinator.workers_per_core,
                            "process_workers": PROCESS_WORKERS,
                            "policies": [p.name for p in coordinator.policies]},
            "endpoints": ENDPOINTS,
            "admin": {
                "auth": "Authorization: Bearer $TOKENGATE_ADMIN_TOKEN",
                "dashboard": f"{ADMIN_PREFIX}/dashboard",
                "routes": [f"{ADMIN_PREFIX}/{r}" for r in (
                    "stats", "affinity", "workers", "history", "tokens/{token_id}", "operations",
                    "quarantine", "metrics", "health", "ready", "events")],
                "docs": "/docs",
            },
        }

    @app.get("/light", responses=TOKEN_ERRORS)
    async def light(n: Annotated[int, Query(ge=1, le=2_000_000)] = 20_000) -> dict[str, Any]:
        """Sum of squares below *n* on a light worker."""
        token = work.light_cpu(n)
        return {"result": await token, **describe(token)}

    @app.get("/medium", responses=TOKEN_ERRORS)
    async def medium(rounds: Annotated[int, Query(ge=1, le=2_000_000)] = 20_000) -> dict[str, Any]:
        """*rounds* chained SHA-256 hashes on a medium worker."""
        token = work.medium_cpu(rounds)
        return {"result": await token, **describe(token)}

    @app.get("/heavy", responses=TOKEN_ERRORS)
    async def heavy(ms: Annotated[int, Query(ge=0, le=2000)] = 500) -> dict[str, Any]:
        """Block a heavy worker for *ms* milliseconds; light endpoints stay fast meanwhile."""
        token = work.heavy_block(ms)
        return {"slept_ms": await token, **describe(token)}

    @app.get("/io", responses=TOKEN_ERRORS)
    async def io(kb: Annotated[int, Query(ge=1, le=4096)] = 64,
                 ms: Annotated[int, Query(ge=0, le=2000)] = 200) -> dict[str, Any]:
        """Write, fsync, wait and read back a temporary file, in the 'slow' storage tier."""
        token = work.disk_roundtrip(kb, ms)
        return {"result": await token, **describe(token)}

    @app.get("/sticky/{user_id}", responses=TOKEN_ERRORS)
    async def sticky(user_id: Annotated[str, Path(min_length=1, max_length=64)],
                     calls: Annotated[int, Query(ge=1, le=32)] = 4) -> dict[str, Any]:
        """Start *calls* overlapping lookups for one user; all of them run on one domain."""
        tokens = [work.user_cache(user_id) for _ in range(calls)]  # all in flight before any settles
        await asyncio.gather(*tokens)
        cores = [t.core_id for t in tokens]
        return {"user_id": user_id, "core_ids": cores, "same_core": len(set(cores)) == 1,
                "calls": [describe(t) for t in tokens]}

    @app.get("/ordered/{account}", responses=TOKEN_ERRORS)
    async def ordered(account: Annotated[str, Path(min_length=1, max_length=64)],
                      calls: Annotated[int, Query(ge=1, le=50)] = 5) -> dict[str, Any]:
        """Append *calls* ledger entries of varying amounts to one account; they run one at a time, in order."""
        amounts = [10 * (i + 1) for i in range(calls)]  # the key is the account alone (sticky_key), not the amount
        tokens = [work.ledger_append(account, amount) for amount in amounts]
        sequence = list(await asyncio.gather(*tokens))
        in_order = sequence == list(range(sequence[0], sequence[0] + len(sequence)))
        return {"account": account, "amounts": amounts, "sequence": sequence, "in_order": in_order,
                "calls": [describe(t) for t in tokens]}

    @app.get("/chain", responses=TOKEN_ERRORS)
    async def chain(parts: Annotated[int, Query(ge=1, le=16)] = 4) -> dict[str, Any]:
        """Run a conductor lead that starts *parts* children and waits for them with ``.get()``."""
        token = work.build_report(parts)
        report = await token
        cores = [token.core_id] + [c["core_id"] for c in report["children"]]
        return {"lead": describe(token), "seed": report["seed"], "children": report["children"],
                "core_ids": cores, "all_same_core": len(set(cores)) == 1}

    @app.post("/process", responses=TOKEN_ERRORS)
    async def process(batch: Batch) -> dict[str, Any]:
        """Summarise a batch. After 5 calls, one far larger than usual answers 409 (quarantined)."""
        token = work.process_batch(batch.items)  # a quarantined call raises here: 409 via the handlers
        return {"result": await token, **describe(token)}

    @app.get("/flaky", response_model=None, responses=FAILING_ERRORS)
    async def flaky(fail_times: Annotated[int, Query(ge=0, le=3)] = 2) -> dict[str, Any] | JSONResponse:
        """Fail *fail_times* times, then succeed: ``attempt`` says which attempt did."""
        token = work.flaky(fail_times, work.AttemptCounter())
        try:
            result = await token
        except work.FlakyError as exc:
            return _failed(token, exc)
        return {"result": result, **describe(token)}

    @app.get("/fail", response_model=None, responses=FAILING_ERRORS)
    async def fail() -> JSONResponse:
        """Always 500; after 5 failures the reputation policy blocks the operation (503 until unblocked)."""
        token = work.always_fails(next(request_numbers))  # a blocked operation raises here: 503
        try:
            await token
        except work.DemoFailure as exc:
            return _failed(token, exc)
        raise AssertionError("always_fails returned")  # pragma: no cover - it always raises

    @app.get("/slow", responses=TOKEN_ERRORS)
    async def slow(seconds: Annotated[float, Query(ge=0, le=30)] = 3.0) -> dict[str, Any]:
        """Block a heavy worker for *seconds*; a drain started meanwhile waits for it."""
        token = work.slow(seconds)
        return {"slept_s": await token, **describe(token)}

    @app.post("/jobs/slow", status_code=202, responses=TOKEN_ERRORS)
    async def slow_job(seconds: Annotated[float, Query(ge=0, le=30)] = 3.0) -> dict[str, Any]:
        """Submit ``slow(seconds)`` and answer at once: the token runs without an awaiter.

        Follow it with ``GET /tokengate/tokens/{token_id}``, kill it before it
        starts with ``POST /tokengate/tokens/{token_id}/kill``.
        """
        token = work.slow(seconds)
        token.add_done_callback(_retrieve_outcome)
        return {**describe(token), "status_url": f"{ADMIN_PREFIX}/tokens/{token.token_id}"}

    @app.get("/cpu", responses=PROCESS_ERRORS)
    async def cpu(n: Annotated[int, Query(ge=1, le=CPU_MAX_N)] = 200_000) -> dict[str, Any]:
        """*n* rounds of pure-Python CPU work in a worker process; ``pid`` is the process that ran it.

        On threads such work shares one GIL; here each worker process runs
        its own interpreter, so concurrent requests use several cores.
        """
        token = work.crunch(n)
        return {**await token, **describe(token)}

    @app.get("/crash", response_model=None, responses=PROCESS_ERRORS)
    async def crash() -> dict[str, Any]:
        """The function ends its worker process (``os._exit(3)``): always 502 ``worker_crashed``.

        Only this call fails; the process is replaced before its next call,
        and every other request goes on (``curl /cpu`` right after works).
        After 5 crashes the reputation policy blocks the operation (503
        ``operation_blocked``) until ``POST /tokengate/operations/example.crash/unblock``.
        """
        await work.crash(next(request_numbers))  # raises WorkerCrashed: 502 via the handlers
        raise AssertionError("crash returned")  # pragma: no cover - its process always dies

    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> Any:
    # `uvicorn example_app.app:app`: build the app on first access, never at import.
    global _app
    if name == "app":
        if _app is None:
            _app = create_app(quarantine_path=os.environ.get(QUARANTINE_ENV_VAR) or None)
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
