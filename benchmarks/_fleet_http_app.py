"""The app ``benchmarks/bench_fleet.py --http`` serves: one trivial endpoint behind TokenGate, the admin router
mounted, default policies; a fleet when ``TOKENGATE_FLEET_DIR`` is set (the coordinator reads it)."""

from __future__ import annotations

from fastapi import FastAPI

from tokengate import task_token_guard
from tokengate_fastapi import add_exception_handlers, admin_router, tokengate_lifespan


@task_token_guard(operation_type="bench.fleet.trivial", tags={"weight": "light"})
def trivial() -> int:
    return 1


app = FastAPI(lifespan=tokengate_lifespan(num_cores=2, workers_per_core=4, process_workers=0, name="benchfleet"))
add_exception_handlers(app)
app.include_router(admin_router(token="bench-fleet-token-0123456789abcdef"), prefix="/tokengate")


@app.get("/trivial")
async def run_trivial() -> int:
    return await trivial()
