"""/events: Server-Sent Events carrying stats, history, operations and quarantine snapshots."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
from fastapi import FastAPI

from tokengate import task_token_guard

pytestmark = pytest.mark.anyio

P = "/tokengate"


@task_token_guard(operation_type="sse.square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


def _parse(text: str) -> list[dict[str, str]]:
    """Split an event stream into events ({"event", "data", "id", "retry"} fields as sent)."""
    events = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ": " not in line:
                continue
            key, value = line.split(": ", 1)
            fields[key] = fields[key] + "\n" + value if key in fields else value
        if fields:
            events.append(fields)
    return events


async def test_events_stream_snapshots(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                       auth: dict[str, str], fake_reputation: Any, fake_quarantine: Any) -> None:
    # Given: some finished work, a reputation row, a pending and a discarded quarantine record
    app = make_app(policies=[fake_reputation, fake_quarantine])
    fake_reputation.rows["sse.square"] = {"operation_type": "sse.square", "attempts": 2}
    fake_quarantine.add("q1")
    fake_quarantine.add("q2", status="discarded")
    async with serve(app) as client:
        assert await square(3) == 9
        # When: three events are read
        response = await client.get(f"{P}/events", params={"max_events": 3}, headers=auth)
    # Then: a text/event-stream of three "stats" events with the documented payload
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = _parse(response.text)
    assert [e["event"] for e in events] == ["stats", "stats", "stats"]
    assert [e["id"] for e in events] == ["0", "1", "2"]
    assert events[0]["retry"] == "1000" and "retry" not in events[1]
    payload = json.loads(events[-1]["data"])
    assert set(payload) == {"stats", "history", "operations", "quarantine"}
    assert payload["stats"]["counts"]["completed"] == 1 and payload["stats"]["pid"] > 0
    assert payload["history"][0]["operation_type"] == "sse.square"
    assert payload["operations"] == [{"operation_type": "sse.square", "attempts": 2, "paused": False,
                                      "held": False, "blocked": False}]
    assert [q["id"] for q in payload["quarantine"]] == ["q1"]  # pending only


async def test_events_without_policies_send_empty_lists(make_app: Callable[..., FastAPI],
                                                        serve: Callable[..., Any], auth: dict[str, str]) -> None:
    async with serve(make_app()) as client:
        response = await client.get(f"{P}/events", params={"max_events": 1}, headers=auth)
    payload = json.loads(_parse(response.text)[0]["data"])
    assert payload["operations"] == [] and payload["quarantine"] == [] and payload["history"] == []


async def test_stream_ends_after_its_maximum_duration(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                      auth: dict[str, str]) -> None:
    # Given: streams limited to 5 ms (so a server's graceful shutdown is never held for long)
    app = make_app(router={"sse_max_duration": 0.005, "sse_interval": 0.01})
    async with serve(app) as client:
        # When: a client reads without max_events
        response = await client.get(f"{P}/events", headers=auth)
    # Then: the stream ended by itself after one or two events
    assert 1 <= len(_parse(response.text)) <= 2


async def test_a_broken_policy_does_not_end_the_stream(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                       auth: dict[str, str], fake_quarantine: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # Given: a quarantine policy whose listing fails
    def broken(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise RuntimeError("database is locked")

    fake_quarantine.list = broken
    async with serve(make_app(policies=[fake_quarantine])) as client:
        response = await client.get(f"{P}/events", params={"max_events": 2}, headers=auth)
    # Then: the events still flow, with an empty quarantine list, and the failure is logged
    events = _parse(response.text)
    assert len(events) == 2 and json.loads(events[0]["data"])["quarantine"] == []
    assert "could not read quarantine" in caplog.text


async def test_bad_max_events_is_422(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                     auth: dict[str, str]) -> None:
    async with serve(make_app()) as client:
        for max_events in ("0", "-1", "many"):
            response = await client.get(f"{P}/events", params={"max_events": max_events}, headers=auth)
            assert response.status_code == 422, max_events


async def test_stream_ends_when_the_coordinator_stops(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                      auth: dict[str, str]) -> None:
    # Given: a coordinator stopped while the app still serves (as during a server's shutdown)
    app = make_app()
    async with serve(app) as client:
        await app.state.tokengate.aclose()
        # When: a client subscribes without max_events
        response = await client.get(f"{P}/events", headers=auth)
    # Then: it gets the final snapshot and the stream ends
    events = _parse(response.text)
    assert len(events) == 1 and json.loads(events[0]["data"])["stats"]["phase"] == "stopped"
