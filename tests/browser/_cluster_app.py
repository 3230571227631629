"""The app the cluster-panel browser test serves with uvicorn: the admin router and one Dask-lane endpoint.

Started in a subprocess by ``test_dashboard_cluster.py`` (``uvicorn _cluster_app:app --app-dir
tests/browser``) with the address of a scheduler the test runs; not collected by pytest.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from tokengate import task_token_guard
from tokengate_fastapi import admin_router, tokengate_lifespan

# Set by the test that starts this app.
ADMIN_TOKEN = os.environ["DASH_ADMIN_TOKEN"]
PREFIX = os.environ["DASH_PREFIX"]


@task_token_guard(operation_type="cluster_double", tags={"lane": "dask", "weight": "heavy"})
def double(x: int) -> int:
    """Trivial work on the Dask cluster."""
    return 2 * x


app = FastAPI(lifespan=tokengate_lifespan(num_cores=2, policies=[], dask_address=os.environ["DASH_DASK_ADDRESS"],
                                          warm_dask=True, dask_inflight=4))
app.include_router(admin_router(token=ADMIN_TOKEN, sse_interval=0.5), prefix=PREFIX)


@app.post("/double/{x}")
async def double_route(x: int) -> dict[str, int]:
    return {"value": await double(x)}
