"""Admin input that would grow memory without bound is refused with 422, not a 500."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from fastapi import FastAPI

import tokengate.coordinator
import tokengate.policies.quarantine
from tokengate.policies import QuarantinePolicy

pytestmark = pytest.mark.anyio

P = "/tokengate"


async def test_pausing_more_operations_than_the_limit_is_a_422(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], auth: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokengate.coordinator, "MAX_PAUSED_OPERATIONS", 2)
    async with serve(make_app()) as client:
        for op in ("a", "b"):
            assert (await client.post(f"{P}/operations/{op}/pause", headers=auth)).status_code == 200
        refused = await client.post(f"{P}/operations/c/pause", headers=auth)
        assert refused.status_code == 422
        assert refused.json()["error"] == "invalid_argument" and "already paused" in refused.json()["detail"]
        assert (await client.post(f"{P}/operations/a/pause", headers=auth)).status_code == 200  # not a new name


async def test_holding_more_operations_than_the_limit_is_a_422(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], auth: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokengate.policies.quarantine, "MAX_HELD_OPERATIONS", 1)
    async with serve(make_app(policies=[QuarantinePolicy(":memory:")])) as client:
        assert (await client.post(f"{P}/operations/a/hold", headers=auth)).status_code == 200
        refused = await client.post(f"{P}/operations/b/hold", headers=auth)
        assert refused.status_code == 422 and "already on hold" in refused.json()["detail"]
