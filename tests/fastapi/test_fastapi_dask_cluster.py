"""The admin API's view of the Dask lane's cluster, against a real scheduler and worker.

``GET /cluster`` (typed), the cluster in ``/stats`` and ``/events`` with every
field the dashboard's cluster panel declares, the Prometheus families, and
``/ready`` while a required lane's scheduler is lost and after it is back. The
scheduler and its worker run in this process on a fixed 127.0.0.1 port
(``tests/dask_host.py``); every wait is bounded; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest
from fastapi import FastAPI

distributed = pytest.importorskip("distributed")

from dask_host import WAIT, SchedulerHost, started_host  # noqa: E402
from test_fastapi_dashboard_contract import declared_fields  # noqa: E402

from tokengate import task_token_guard  # noqa: E402
from tokengate.lanes.dask_errors import ClusterDown  # noqa: E402

P = "/tokengate"

pytestmark = pytest.mark.slow  # two scheduler starts and a client reconnect: a few seconds


@task_token_guard(operation_type="cluster.double", tags={"lane": "dask", "weight": "heavy"})
def double(x: int) -> int:
    return 2 * x


@pytest.fixture
def host() -> Iterator[SchedulerHost]:
    with started_host() as h:
        yield h


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {WAIT}s")
        await asyncio.sleep(0.05)


def _metric(text: str, name: str) -> float:
    """The value of the one sample of *name* (with the coordinator label only) in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + "{") and line.count("=") == 1:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample of {name} in the exposition")


@pytest.mark.anyio
async def test_cluster_route_panel_fields_metrics_and_ready_across_a_lost_scheduler(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], auth: dict[str, str],
        host: SchedulerHost) -> None:
    # Given an app whose coordinator has a required Dask lane connected to a real scheduler
    app = make_app(num_cores=2, dask_address=host.address, warm_dask=True)
    async with serve(app) as client:
        assert await double(21) == 42
        ready = await client.get(f"{P}/ready")
        assert ready.status_code == 200 and ready.json()["cluster"] == "connected"

        # When the cluster is read through the admin API
        answer = (await client.get(f"{P}/cluster", headers=auth)).json()
        stats = (await client.get(f"{P}/stats", headers=auth)).json()
        stream = (await client.get(f"{P}/events", params={"max_events": 1}, headers=auth)).text
        event = json.loads(next(line for line in stream.splitlines() if line.startswith("data: "))[len("data: "):])
        metrics = (await client.get(f"{P}/metrics", headers=auth)).text

        # Then GET /cluster is typed and complete
        assert answer["enabled"] is True
        cluster = answer["cluster"]
        assert cluster["state"] == "connected" and cluster["required"] and not cluster["embedded"]
        assert cluster["scheduler_address"] == host.address
        assert [w["resources"] for w in cluster["workers"]] == [{"heavy": 1, "medium": 1, "light": 1}]
        assert set(cluster["inflight_by_class"]) == {"heavy", "medium", "light"}
        assert cluster["completed"] >= 1
        # and every field the dashboard's cluster panel reads is in /stats and in /events
        declared = declared_fields()
        for source in (stats, event["stats"]):
            shown = source["lanes"]["dask"]["cluster"]
            assert set(declared["cluster"]) <= set(shown)
            assert shown["workers"] and all(set(declared["cluster_worker"]) <= set(w) for w in shown["workers"])
        # and the Prometheus families say connected, one worker, nothing lost
        assert _metric(metrics, "tokengate_dask_connected") == 1.0
        assert _metric(metrics, "tokengate_dask_workers") == 1.0
        assert 'tokengate_dask_inflight{coordinator="tgtest",weight="heavy"}' in metrics
        assert _metric(metrics, "tokengate_dask_lost_total") == 0.0

        # When the scheduler goes away
        host.stop_scheduler()
        host.stop_worker()

        async def not_ready() -> bool:
            return (await client.get(f"{P}/ready")).status_code == 503

        # Then /ready says why with 503, new Dask-lane calls are refused at submit, and the metrics follow
        await _until(not_ready, "/ready to answer 503")
        body = (await client.get(f"{P}/ready")).json()
        assert body["status"] == "cluster_unavailable" and body["cluster"] == "unavailable"
        with pytest.raises(ClusterDown):
            double(1)
        metrics = (await client.get(f"{P}/metrics", headers=auth)).text
        assert _metric(metrics, "tokengate_dask_connected") == 0.0
        assert _metric(metrics, "tokengate_dask_refused_at_submit_total") >= 1.0

        # When the scheduler comes back on the same address
        host.start()

        async def is_ready() -> bool:
            return (await client.get(f"{P}/ready")).status_code == 200

        # Then the app is ready again and Dask-lane calls run
        await _until(is_ready, "/ready to answer 200 again")
        assert await double(5) == 10
        metrics = (await client.get(f"{P}/metrics", headers=auth)).text
        assert _metric(metrics, "tokengate_dask_reconnects_total") >= 1.0


@pytest.mark.anyio
async def test_cluster_route_without_a_dask_lane(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                 auth: dict[str, str]) -> None:
    app = make_app(dask_inflight=0)
    async with serve(app) as client:
        answer = (await client.get(f"{P}/cluster", headers=auth)).json()
        assert answer["enabled"] is False and answer["cluster"] is None
        assert "cluster" not in (await client.get(f"{P}/ready")).json()  # answers as before the Dask lane
        assert (await client.get(f"{P}/cluster")).status_code == 401
