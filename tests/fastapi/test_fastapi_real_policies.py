"""The admin API against the real policies (not the fakes), end to end: reputation and quarantine, and every
route with every real policy installed (sticky, conductor, storage tiers, retries too)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from fastapi import FastAPI

from tokengate import (ConductorPolicy, Policy, RetryPolicy, StickyPolicy, StorageTierPolicy, TokenQuarantined,
                       task_token_guard)
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.policies.reputation import ReputationPolicy
from tokengate_fastapi import add_exception_handlers
from tokengate_fastapi.schemas import OperationReputation

pytestmark = pytest.mark.anyio

P = "/tokengate"


@task_token_guard(operation_type="real.square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


async def test_hold_quarantine_release_block_unblock(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                     auth: dict[str, str]) -> None:
    reputation, quarantine = ReputationPolicy(), QuarantinePolicy(":memory:")
    app = make_app(policies=[reputation, quarantine])
    add_exception_handlers(app)

    @app.post("/square/{x}")
    async def run(x: int) -> dict[str, int]:
        return {"result": await square(x)}

    async with serve(app) as client:
        assert (await client.post("/square/2")).json() == {"result": 4}
        # Given: the operation put on hold through the admin API
        assert (await client.post(f"{P}/operations/real.square/hold", headers=auth)).json()["held"] is True
        # When: a call comes in, Then: 409 with the quarantine id
        held = await client.post("/square/7")
        assert held.status_code == 409 and held.json()["error"] == "token_quarantined"
        qid = held.json()["quarantine_id"]
        pending = (await client.get(f"{P}/quarantine", params={"status": "pending"}, headers=auth)).json()
        assert [r["id"] for r in pending] == [qid]
        # When: unheld and released, Then: the call runs as a new token
        await client.post(f"{P}/operations/real.square/unhold", headers=auth)
        released = (await client.post(f"{P}/quarantine/{qid}/release", headers=auth)).json()
        coordinator = app.state.tokengate
        token = coordinator.get_token(released["token_id"])
        if token is not None:  # still running: wait for it (it may also have finished already)
            assert await token == 49
        assert coordinator.find_token_record(released["token_id"])["state"] == "completed"
        again = await client.post(f"{P}/quarantine/{qid}/release", headers=auth)
        assert again.status_code == 409 and again.json()["error"] == "quarantine_conflict"
        # Given: the operation blocked by its reputation; Then: 503 operation_blocked, until unblocked
        reputation.block("real.square")
        blocked = await client.post("/square/3")
        assert blocked.status_code == 503 and blocked.json()["error"] == "operation_blocked"
        assert "retry-after" in blocked.headers
        rows = (await client.get(f"{P}/operations", headers=auth)).json()
        assert rows[0]["operation_type"] == "real.square" and rows[0]["blocked"] is True
        assert rows[0]["successes"] >= 1
        assert (await client.post(f"{P}/operations/real.square/unblock", headers=auth)).json()["blocked"] is False
        assert (await client.post("/square/3")).json() == {"result": 9}


async def test_quarantine_offset_beyond_the_store_range_is_422(make_app: Callable[..., FastAPI],
                                                               serve: Callable[..., Any],
                                                               auth: dict[str, str]) -> None:
    # Given: the real quarantine (SQLite stores offsets as 64-bit integers)
    app = make_app(policies=[QuarantinePolicy(":memory:")])
    async with serve(app) as client:
        for offset in (2**63, 10**30):
            # When: a page far beyond any store is asked for
            response = await client.get(f"{P}/quarantine", params={"offset": offset}, headers=auth)
            # Then: a typed 422, not a 500 from the database driver
            assert response.status_code == 422, offset
            assert response.json()["error"] == "invalid_argument", offset
        # the largest accepted offset is simply an empty page, and the route keeps working
        page = await client.get(f"{P}/quarantine", params={"offset": 2**63 - 1}, headers=auth)
        assert page.status_code == 200 and page.json() == []
        assert (await client.get(f"{P}/quarantine", headers=auth)).json() == []


# -- every admin route with every real policy installed ---------------------------------------------------


@task_token_guard(operation_type="real.ordered", tags={"weight": "light", "sticky_anchor": "account", "ordered": True})
def ordered(account: str, x: int) -> int:
    return x


@task_token_guard(operation_type="real.tiered", tags={"weight": "light", "storage_speed": "slow"})
def tiered(x: int) -> int:
    return -x


@task_token_guard(operation_type="real.member", tags={"weight": "light"})
def member(x: int) -> int:
    return x + 1


@task_token_guard(operation_type="real.lead", tags={"weight": "medium", "external_calls": ["real.member"]})
def lead(n: int) -> int:
    # Members called inside a lead join its domain; get() on a worker runs an unstarted one inline.
    return sum(member(i).get(timeout=10) for i in range(n))


_FLAKY_ATTEMPTS: dict[str, int] = {}


@task_token_guard(operation_type="real.flaky", tags={"weight": "light", "retries": 2, "retry_backoff": 0.001})
def flaky(key: str) -> str:
    _FLAKY_ATTEMPTS[key] = _FLAKY_ATTEMPTS.get(key, 0) + 1
    if _FLAKY_ATTEMPTS[key] == 1:
        raise ConnectionError("first attempt fails")
    return key


@task_token_guard(operation_type="real.fails", tags={"weight": "light"})
def fails() -> None:
    raise ValueError("always")


def real_policies(tmp_path: Path) -> list[Policy]:
    """Every real policy, in the README's order (tiers after every policy that may hold a call)."""
    return [ReputationPolicy(), QuarantinePolicy(str(tmp_path / "quarantine.sqlite3")), StickyPolicy(),
            ConductorPolicy(), StorageTierPolicy(limits={"slow": 2}), RetryPolicy()]


async def test_every_admin_route_with_every_real_policy(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                        auth: dict[str, str], tmp_path: Path) -> None:
    app = make_app(policies=real_policies(tmp_path), num_cores=2)
    async with serve(app) as client:
        coordinator = app.state.tokengate
        # Given: work through every policy: ordered sticky keys, a storage tier, a lead and its members,
        # a retried call, a failing one, and a call quarantined by a hold
        assert list(await asyncio.gather(*(ordered("acct-1", i) for i in range(5)))) == list(range(5))
        assert list(await asyncio.gather(*(tiered(i) for i in range(4)))) == [0, -1, -2, -3]
        assert await lead(3) == 6
        assert await flaky("k") == "k" and _FLAKY_ATTEMPTS["k"] == 2
        with pytest.raises(ValueError):
            await fails()
        assert (await client.post(f"{P}/operations/real.member/hold", headers=auth)).json()["held"] is True
        with pytest.raises(TokenQuarantined) as held:
            await member(41)
        assert (await client.post(f"{P}/operations/real.member/unhold", headers=auth)).json()["held"] is False
        qid = held.value.quarantine_id

        # /stats: every policy reports its section, with what it saw
        stats = (await client.get(f"{P}/stats", headers=auth)).json()
        policies = stats["policies"]
        assert {"reputation", "quarantine", "sticky", "conductor", "storage_tiers", "retries"} <= set(policies)
        assert policies["sticky"]["opened_total"] >= 1 and policies["sticky"]["pins"] == 0
        assert policies["conductor"]["opened_total"] == 1 and policies["conductor"]["domains"] == 0
        assert policies["storage_tiers"]["tiers"]["slow"]["limit"] == 2
        assert policies["storage_tiers"]["tiers"]["slow"]["total"] == 4
        assert policies["storage_tiers"]["tiers"]["slow"]["active"] == 0
        assert policies["quarantine"]["quarantined_by_trigger"]["held_operation"] == 1
        assert stats["counts"]["retries"] == 1 and stats["counts"]["failed"] == 1
        assert stats["counts"]["quarantined"] == 1 and stats["counts"]["inflight"] == 0

        # /affinity, /workers, /history, /tokens
        affinity = (await client.get(f"{P}/affinity", headers=auth)).json()
        assert affinity["routed_by_weight"]["medium"] == 1  # the lead; its members and the rest are light
        assert sum(core["routed_total"] for core in affinity["cores"]) == sum(affinity["routed_by_weight"].values())
        workers = (await client.get(f"{P}/workers", headers=auth)).json()
        assert len(workers) == 4 and {w["core_id"] for w in workers} == {1, 2}
        history = (await client.get(f"{P}/history", params={"limit": 1000}, headers=auth)).json()
        by_op = {r["operation_type"] for r in history}
        assert {"real.ordered", "real.tiered", "real.lead", "real.member", "real.flaky", "real.fails"} <= by_op
        flaky_row = next(r for r in history if r["operation_type"] == "real.flaky")
        assert flaky_row["attempt"] == 2 and flaky_row["state"] == "completed"
        fails_row = next(r for r in history if r["operation_type"] == "real.fails")
        assert fails_row["error"] == "ValueError" and fails_row["success"] is False
        token = (await client.get(f"{P}/tokens/{flaky_row['token_id']}", headers=auth)).json()
        assert token["settled"] is True and token["attempt"] == 2
        killed = await client.post(f"{P}/tokens/{flaky_row['token_id']}/kill", headers=auth)
        assert killed.status_code == 409 and killed.json()["error"] == "token_already_settled"

        # /operations: the real reputation's rows, every documented field filled in
        rows = {r["operation_type"]: r for r in (await client.get(f"{P}/operations", headers=auth)).json()}
        assert rows["real.fails"]["failures"] == 1 and rows["real.fails"]["completion_rate"] == 0.0
        assert rows["real.ordered"]["attempts"] == 5 and rows["real.ordered"]["successes"] == 5
        assert rows["real.ordered"]["health"] == "excellent"
        assert rows["real.ordered"]["run_time"]["mean"] is not None
        for op in ("real.ordered", "real.tiered", "real.lead", "real.member", "real.flaky", "real.fails"):
            assert all(rows[op][field] is not None for field in OperationReputation.model_fields), op
        for action, flags in (("pause", {"paused": True}), ("resume", {"paused": False}),
                              ("hold", {"held": True}), ("unhold", {"held": False})):
            state = (await client.post(f"{P}/operations/real.tiered/{action}", headers=auth)).json()
            assert {k: state[k] for k in flags} == flags, action
        coordinator.policy("reputation").block("real.fails")
        assert (await client.post(f"{P}/operations/real.fails/unblock", headers=auth)).json()["blocked"] is False
        assert (await client.post(f"{P}/operations/real.fails/kill", headers=auth)).json()["killed"] == 0

        # /quarantine: the real record, every documented field filled in; release re-runs it
        listed = (await client.get(f"{P}/quarantine", params={"status": "pending"}, headers=auth)).json()
        assert [r["id"] for r in listed] == [qid]
        record = (await client.get(f"{P}/quarantine/{qid}", headers=auth)).json()
        assert record["operation_type"] == "real.member" and record["trigger"] == "held_operation"
        assert "41" in record["args_summary"] and record["has_payload"] is True
        released = (await client.post(f"{P}/quarantine/{qid}/release", headers=auth)).json()
        again = coordinator.get_token(released["token_id"])
        if again is not None:  # still running: wait for it (it may also have finished already)
            assert await again == 42
        assert coordinator.find_token_record(released["token_id"])["state"] == "completed"
        assert (await client.delete(f"{P}/quarantine/{qid}", headers=auth)).status_code == 409

        # gate control, probes, metrics and the event stream
        assert (await client.post(f"{P}/pause", headers=auth)).json()["paused"] is True
        assert (await client.get(f"{P}/ready")).status_code == 503
        assert (await client.post(f"{P}/resume", headers=auth)).json()["paused"] is False
        assert (await client.post(f"{P}/drain", json={"wait": True, "timeout": 5}, headers=auth)).json()["drained"]
        assert (await client.post(f"{P}/resume", headers=auth)).json()["draining"] is False
        assert (await client.get(f"{P}/health")).status_code == 200
        assert (await client.get(f"{P}/ready")).status_code == 200
        metrics = (await client.get(f"{P}/metrics", headers=auth)).text
        assert 'tokengate_settled_total{coordinator="tgtest",state="quarantined"} 1.0' in metrics
        # The released record's outcome is stored by the quarantine's writer thread: wait for it.
        assert await asyncio.to_thread(coordinator.policy("quarantine").flush)  # type: ignore[union-attr]
        event = (await client.get(f"{P}/events", params={"max_events": 1}, headers=auth)).text
        payload = json.loads(next(line for line in event.splitlines() if line.startswith("data: "))[6:])
        assert {r["operation_type"] for r in payload["operations"]} >= {"real.ordered", "real.fails"}
        assert payload["quarantine"] == []  # released: no longer pending
        assert set(payload["stats"]["policies"]) == set(policies)
