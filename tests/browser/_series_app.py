"""The app the charts' browser test serves with uvicorn: small queues and a fast series sampler.

Started in a subprocess by ``test_dashboard_charts.py``
(``uvicorn _series_app:app --app-dir tests/browser``); not collected by pytest.
Two domains of two workers, mailboxes of one and at most four pending calls
per class, so a modest burst is refused with ``Overloaded``; the series are
sampled every 0.2 s over 60 s so the charts move within a test's patience.
"""

from __future__ import annotations

import asyncio
import os
import time

from fastapi import FastAPI

from tokengate import GateClosed, Overloaded, TaskToken, task_token_guard
from tokengate_fastapi import admin_router, tokengate_lifespan

ADMIN_TOKEN = os.environ["DASH_ADMIN_TOKEN"]
PREFIX = os.environ["DASH_PREFIX"]


@task_token_guard(operation_type="charts_light", tags={"weight": "light"})
def light(x: int) -> int:
    """Trivial light work."""
    return x


@task_token_guard(operation_type="charts_heavy", tags={"weight": "heavy"})
def heavy(x: int) -> int:
    """Trivial heavy work."""
    return -x


@task_token_guard(operation_type="charts_slow", tags={"weight": "light"})
def slow(x: int) -> int:
    """Light work that holds its worker for 20 ms, so a burst queues and overflows."""
    time.sleep(0.02)
    return x


app = FastAPI(lifespan=tokengate_lifespan(
    num_cores=2, workers_per_core=2, mailbox_size=1, max_pending=4, process_workers=0, policies=[],
))
app.include_router(admin_router(token=ADMIN_TOKEN, series_interval=0.2, series_window=60), prefix=PREFIX)


async def _run(tokens: list[TaskToken[int]], refused: int) -> dict[str, int]:
    await asyncio.gather(*tokens)
    return {"done": len(tokens), "refused": refused}


@app.post("/work")
async def work(n: int = 20) -> dict[str, int]:
    """Run *n* light and *n* heavy calls, in waves of 4 of each (the queues hold them: nothing is overloaded).

    Calls refused (by a drain) are counted, the others awaited.
    """
    done = refused = 0
    for start in range(0, n, 4):
        tokens: list[TaskToken[int]] = []
        for i in range(start, min(n, start + 4)):
            for fn in (light, heavy):
                try:
                    tokens.append(fn(i))
                except (GateClosed, Overloaded):
                    refused += 1
        done += (await _run(tokens, 0))["done"]
    return {"done": done, "refused": refused}


@app.post("/burst")
async def burst(n: int = 30) -> dict[str, int]:
    """Submit *n* slow light calls at once: the queues hold 8 (2 running, 2 in mailboxes, 4 pending)."""
    tokens: list[TaskToken[int]] = []
    refused = 0
    for i in range(n):
        try:
            tokens.append(slow(i))
        except Overloaded:
            refused += 1
    return await _run(tokens, refused)
