"""Fleet mode of the admin API, in one process: two apps (two coordinators) sharing one fleet directory.

Each app is what one server process runs; they meet only through the fleet
file, as ``uvicorn --workers 2`` processes do (tests/fleet/test_fleet_uvicorn.py
runs the real thing). Waits poll the other member's state with a bound: the
members talk through a file, so there is no event to wait on.

In one process a decorated call goes to the most recently started
coordinator (``current_coordinator()``), whichever app's endpoint made it;
so these tests compare the fleet's figures with each coordinator's own
``stats()``, and the real multi-process test checks who served what.
"""

from __future__ import annotations

import asyncio
import threading
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from tokengate import OperationsCoordinator, current_coordinator, task_token_guard
from tokengate.fleet import Fleet
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate_fastapi import add_exception_handlers, admin_router, tokengate_lifespan
from tokengate_fastapi.fleet import MEMBER_HEADER

TOKEN = "fleet-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
P = "/tokengate"

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@task_token_guard(operation_type="fleet.work", tags={"weight": "light"})
def work(x: int) -> int:
    return x + 1


_gate = threading.Event()


@task_token_guard(operation_type="fleet.blocked", tags={"weight": "light"})
def blocked() -> str:
    _gate.wait(30)
    return "done"


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll *predicate* until true (bounded): the other member changes only through the fleet file."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Member:
    """One app (one 'server process') and a client to it."""

    def __init__(self, app: FastAPI, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    @property
    def coordinator(self) -> OperationsCoordinator:
        coordinator: OperationsCoordinator = self.app.state.tokengate
        return coordinator

    @property
    def fleet(self) -> Fleet:
        assert self.coordinator.fleet is not None
        return self.coordinator.fleet

    @property
    def id(self) -> str:
        assert self.fleet.member_id is not None
        return self.fleet.member_id

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(P + path, headers=AUTH, **kw)

    async def post(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.post(P + path, headers=AUTH, **kw)


def make_app(fleet_dir: Path, *, quarantine: bool = False) -> FastAPI:
    def factory() -> OperationsCoordinator:
        policies = [QuarantinePolicy(":memory:")] if quarantine else []
        coordinator = OperationsCoordinator(num_cores=1, workers_per_core=2, policies=policies, name="fleetapp",
                                            process_workers=0, fleet_dir=fleet_dir)
        # Faster beats than the default 1 s, so the tests wait less; same code paths. No test here
        # is about deadlines: a member is judged gone after 4 s of silence (not 0.6 s) and a
        # command waits up to 20 s for acknowledgements, so a loaded CI host's stall of the
        # shared loop cannot drop a member from a broadcast (the Python 3.13 CI run saw a
        # fleet kill acknowledged by one member of two).
        coordinator.fleet = Fleet(fleet_dir, heartbeat_interval=0.2, poll_interval=0.05, missed_heartbeats=20,
                                  ack_timeout=20)
        return coordinator

    app = FastAPI(lifespan=tokengate_lifespan(coordinator_factory=factory, drain_timeout=2))
    app.include_router(admin_router(token=TOKEN), prefix=P)
    add_exception_handlers(app)

    @app.get("/work/{x}")
    async def run_work(x: int) -> int:
        return await work(x)

    return app


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Member]]]:
    async with AsyncExitStack() as stack:
        async def starter(quarantine: bool = False) -> Member:
            app = make_app(tmp_path / "fleet", quarantine=quarantine)
            manager = await stack.enter_async_context(LifespanManager(app))
            client = await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=manager.app), base_url="http://test"))
            member = Member(app, client)
            await wait_for(lambda: member.fleet.member_id is not None, "the member to join")
            return member

        yield starter
        _gate.set()


async def seen_by(observer: Member, *members: Member) -> None:
    """Wait until *observer*'s view holds a published snapshot of each of *members*."""
    await wait_for(lambda: all(m.id in observer.fleet.view.snapshots for m in members), "published snapshots")


async def test_stats_totals_are_the_sum_of_the_members(start: Callable[..., Awaitable[Member]]) -> None:
    a = await start()
    for x in range(5):  # on a: the only coordinator yet
        assert (await a.client.get(f"/work/{x}")).json() == x + 1
    b = await start()
    for x in range(3):  # on b, the current coordinator from now on
        assert (await b.client.get(f"/work/{x}")).json() == x + 1
    await wait_for(lambda: (a.fleet.view.snapshots.get(b.id, (0, {}))[1].get("stats", {}).get("counts", {})
                            .get("completed") == b.coordinator.stats()["counts"]["completed"]), "b's figures in a's view")
    response = await a.get("/stats")
    body = response.json()
    assert response.headers[MEMBER_HEADER] == a.id and body["member"] == a.id
    fleet = body["fleet"]
    rows = {m["member"]: m for m in fleet["members"]}
    assert set(rows) == {a.id, b.id} and rows[a.id]["self"] and not rows[b.id]["self"]
    for member in (a, b):
        assert rows[member.id]["counts"]["completed"] == member.coordinator.stats()["counts"]["completed"]
    assert rows[a.id]["snapshot_age"] == 0.0 and rows[b.id]["snapshot_age"] >= 0.0
    assert fleet["totals"]["members"] == 2
    for key in ("accepted", "completed", "settled"):
        assert fleet["totals"]["counts"][key] == sum(m["counts"][key] for m in fleet["members"]) == 8
    assert body["counts"]["completed"] == a.coordinator.stats()["counts"]["completed"]  # this process's own
    assert "fleet" not in (await a.get("/stats", params={"scope": "member"})).json()

    workers = (await b.get("/workers")).json()
    assert {w["member"] for w in workers} == {a.id, b.id} and len(workers) == 4
    history = (await b.get("/history")).json()
    assert len(history) == 8 and {h["member"] for h in history} == {a.id, b.id}
    assert all(h["token_id"].startswith(h["member"] + "-") for h in history)
    finished = [h["finished_at"] for h in history]
    assert finished == sorted(finished, reverse=True)
    affinity = (await a.get("/affinity")).json()
    assert affinity["fleet"]["routed_by_weight"]["light"] == 8
    health = (await b.get("/health")).json()
    assert health["member"] == b.id and {m["member"] for m in health["fleet"]["members"]} == {a.id, b.id}


async def test_a_token_is_found_on_whichever_member_holds_it(start: Callable[..., Awaitable[Member]]) -> None:
    a, b = await start(), await start()
    assert current_coordinator() is b.coordinator  # the call below runs on b
    await b.client.get("/work/41")
    [record] = (await b.get("/history", params={"scope": "member"})).json()
    fleet_id = f"{b.id}-{record['token_id']}"
    found = await a.get(f"/tokens/{fleet_id}")  # asked of a, held by b
    assert found.status_code == 200, found.text
    assert found.json()["member"] == b.id and found.json()["token_id"] == fleet_id
    assert found.json()["state"] == "completed"
    killed = await a.post(f"/tokens/{fleet_id}/kill")
    assert killed.status_code == 409 and killed.json()["error"] == "token_already_settled"
    missing = await a.get(f"/tokens/{b.id}-999999")
    assert missing.status_code == 404
    unknown = await a.get("/tokens/zzzzzz-1")
    assert unknown.status_code == 404 and "not a live member" in unknown.json()["detail"]


async def test_kill_of_a_queued_token_on_another_member(start: Callable[..., Awaitable[Member]]) -> None:
    a, b = await start(), await start()
    assert current_coordinator() is b.coordinator  # the calls below run on b
    _gate.clear()
    # Fill b's two workers, then queue one more call behind them.
    running = [asyncio.ensure_future(_call_blocked()) for _ in range(2)]
    await wait_for(lambda: b.coordinator.stats()["counts"]["executing"] == 2, "both workers busy")
    queued = asyncio.ensure_future(_call_blocked())
    await wait_for(lambda: b.coordinator.inflight == 3, "a queued call")
    live = [t for t in b.coordinator._live.values() if t.state.value != "executing"]
    assert len(live) == 1
    response = await a.post(f"/tokens/{b.id}-{live[0].token_id}/kill")
    assert response.status_code == 200, response.text
    assert response.json()["killed"] is True and response.json()["member"] == b.id
    _gate.set()
    await asyncio.gather(*running)
    with pytest.raises(Exception, match="killed"):
        await queued


async def _call_blocked() -> str:
    return await blocked()


async def test_pause_resume_and_drain_reach_every_member(start: Callable[..., Awaitable[Member]]) -> None:
    a, b = await start(), await start()
    await seen_by(a, b)
    paused = (await a.post("/pause")).json()
    assert paused["paused"] is True and paused["member"] == a.id
    applied = {row["member"] for row in paused["fleet"]["applied"]}
    assert applied == {a.id, b.id} and paused["fleet"]["not_applied"] == []
    assert b.coordinator.paused  # applied there before the answer came back
    ready = await b.client.get(P + "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "paused" and ready.json()["member"] == b.id
    assert (await b.post("/resume")).json()["fleet"]["not_applied"] == []
    assert not a.coordinator.paused and not b.coordinator.paused

    drained = await a.post("/drain", json={"wait": True, "timeout": 2})
    assert drained.status_code == 200
    body = drained.json()
    assert body["drained"] is True and {r["member"] for r in body["fleet"]["applied"]} == {a.id, b.id}
    assert a.coordinator.draining and b.coordinator.draining
    for member in (a, b):
        assert (await member.client.get(P + "/ready")).json()["status"] == "draining"
        refused = await member.client.get("/work/1")
        assert refused.status_code == 503 and refused.json()["error"] == "gate_closed"
        assert "Retry-After" in refused.headers
    await a.post("/resume")
    assert not b.coordinator.draining


async def test_a_member_that_starts_while_the_fleet_is_paused_starts_paused(
        start: Callable[..., Awaitable[Member]]) -> None:
    a = await start(quarantine=True)
    await a.post("/pause")
    await a.post("/operations/fleet.slow/pause")
    held = await a.post("/operations/fleet.work/hold")
    assert held.json()["held"] is True
    c = await start(quarantine=True)
    assert c.coordinator.paused  # before its first request could be admitted
    assert "fleet.slow" in c.coordinator.stats()["paused_operations"]
    quarantine = c.coordinator.policy("quarantine")
    assert "fleet.work" in quarantine.held_operations()  # type: ignore[attr-defined]
    info = (await c.get("/fleet")).json()
    assert info["enabled"] and info["desired"]["paused"] and info["desired"]["held_operations"] == ["fleet.work"]
    await c.post("/operations/fleet.work/unhold")
    await c.post("/resume")
    await wait_for(lambda: not a.coordinator.paused, "the resume to reach a")
    assert "fleet.work" not in a.coordinator.policy("quarantine").held_operations()  # type: ignore[attr-defined]


async def test_operation_actions_list_who_applied_them(start: Callable[..., Awaitable[Member]]) -> None:
    a, b = await start(), await start()
    await seen_by(a, b)
    state = (await a.post("/operations/fleet.work/pause")).json()
    assert state["paused"] is True and {r["member"] for r in state["fleet"]["applied"]} == {a.id, b.id}
    assert "fleet.work" in b.coordinator.stats()["paused_operations"]
    # hold needs the quarantine policy, which these members lack: refused here, sent nowhere
    refused = await a.post("/operations/fleet.work/hold")
    assert refused.status_code == 404
    killed = (await b.post("/operations/fleet.work/kill")).json()
    assert killed["killed"] == 0 and len(killed["fleet"]["applied"]) == 2
    await b.post("/operations/fleet.work/resume")
    resumed_at = b.fleet.clock()
    await wait_for(lambda: "fleet.work" not in a.coordinator.stats()["paused_operations"], "resume on a")

    def b_published_resumed() -> bool:
        # A snapshot b published after its resume. Not just "no paused row in a's view": a's view
        # may still hold b's snapshot from before the pause, and one built while paused may land later.
        at, snap = a.fleet.view.snapshots.get(b.id, (0.0, {}))
        return at > resumed_at and not any(r["operation_type"] == "fleet.work" and r["paused"]
                                           for r in snap.get("operations", []))

    await wait_for(b_published_resumed, "b's published operations after its resume")
    rows = (await a.get("/operations")).json()
    assert all(not r["paused"] for r in rows)


async def test_a_member_that_leaves_keeps_its_counts_in_the_totals(
        start: Callable[..., Awaitable[Member]], tmp_path: Path) -> None:
    a = await start()
    app = make_app(tmp_path / "fleet")
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client:
            for x in range(4):
                await client.get(f"/work/{x}")
            gone_id = app.state.tokengate.fleet.member_id
    await wait_for(lambda: a.fleet.view.retired.get("completed") == 4.0, "the departed member's counters")
    totals = (await a.get("/stats")).json()["fleet"]["totals"]
    assert totals["members"] == 1 and totals["counts"]["completed"] == 4
    info = (await a.get("/fleet")).json()
    assert [d["member_id"] for d in info["departed"]] == [gone_id] and info["departed"][0]["state"] == "left"
    metrics = (await a.get("/metrics")).text
    assert 'tokengate_fleet_settled_total{coordinator="fleetapp",state="completed"} 4.0' in metrics
    assert f'member="{a.id}"' in metrics and "tokengate_fleet_members" in metrics


async def test_metrics_carry_a_member_label_and_fleet_totals(start: Callable[..., Awaitable[Member]]) -> None:
    a = await start()
    await a.client.get("/work/1")  # on a (the only coordinator yet)
    b = await start()
    await b.client.get("/work/1")  # on b from now on
    await b.client.get("/work/2")
    await wait_for(lambda: a.fleet.view.snapshots.get(b.id, (0, {}))[1].get("stats", {}).get("counts", {})
                   .get("completed") == 2, "b's published figures")
    # /metrics reads the members' published figures from the file: wait until a's own is current too
    await wait_for(lambda: b.fleet.view.snapshots.get(a.id, (0, {}))[1].get("stats", {}).get("counts", {})
                   .get("completed") == 1, "a's published figures")
    text = (await b.get("/metrics")).text
    assert f'tokengate_accepted_total{{coordinator="fleetapp",member="{a.id}"}} 1.0' in text
    assert f'tokengate_accepted_total{{coordinator="fleetapp",member="{b.id}"}} 2.0' in text
    assert 'tokengate_fleet_accepted_total{coordinator="fleetapp"} 3.0' in text
    assert 'tokengate_fleet_members{coordinator="fleetapp"} 2.0' in text
    own = (await b.get("/metrics", params={"scope": "member"})).text
    assert "member=" not in own and "tokengate_fleet_" not in own


async def test_without_a_fleet_the_answers_are_unchanged(tmp_path: Path) -> None:
    app = FastAPI(lifespan=tokengate_lifespan(num_cores=1, workers_per_core=1, policies=[], process_workers=0))
    app.include_router(admin_router(token=TOKEN), prefix=P)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client:
            stats = await client.get(P + "/stats", headers=AUTH)
            assert "fleet" not in stats.json() and "member" not in stats.json()
            assert MEMBER_HEADER not in stats.headers
            assert (await client.get(P + "/health")).json().keys() == {"status", "pid"}
            info = (await client.get(P + "/fleet", headers=AUTH)).json()
            assert info["enabled"] is False and "TOKENGATE_FLEET_DIR" in info["error"]
            assert (await client.get(P + "/tokens/abc123-1", headers=AUTH)).status_code == 404


async def test_a_fleet_file_that_cannot_be_used_does_not_stop_the_server(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the fleet directory should be")
    app = make_app(blocker)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://t") as client:
            assert (await client.get("/work/1")).json() == 2
            info = (await client.get(P + "/fleet", headers=AUTH)).json()
            assert info["enabled"] and not info["joined"] and "fleet directory" in info["error"]
            assert "fleet" not in (await client.get(P + "/stats", headers=AUTH)).json()
            paused = (await client.post(P + "/pause", headers=AUTH)).json()
            assert paused["paused"] is True and "fleet" not in paused  # applied here, as without a fleet
