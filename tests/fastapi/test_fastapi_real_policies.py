"""The admin API against the real reputation and quarantine policies (not the fakes), end to end."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from fastapi import FastAPI

from tokengate import task_token_guard
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.policies.reputation import ReputationPolicy
from tokengate_fastapi import add_exception_handlers

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
