"""/events: Server-Sent Events carrying stats, history, operations and quarantine snapshots; one snapshot per
tick shared by every stream, the stream cap, and the broadcaster's life (no task outlives its streams)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import pytest
from fastapi import FastAPI

from tokengate import task_token_guard
from tokengate_fastapi import _routes_live as live_module
from tokengate_fastapi._routes_live import LiveStreams, close_event_streams, encode_snapshot, open_event_streams

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
    assert payload["history"][0]["operation_type"] == "sse.square" and payload["history"][0]["lane"] == "thread"
    assert payload["operations"] == [{"operation_type": "sse.square", "attempts": 2, "paused": False,
                                      "held": False, "blocked": False, "lane": "thread"}]
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
                                                       caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: a quarantine policy whose listing fails
    def broken(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise RuntimeError("database is locked")

    fake_quarantine.list = broken
    monkeypatch.setattr(live_module, "_guarded_logged_at", {})
    async with serve(make_app(policies=[fake_quarantine])) as client:
        response = await client.get(f"{P}/events", params={"max_events": 3}, headers=auth)
    # Then: the events still flow, with an empty quarantine list, and the failure is logged once, not per tick
    events = _parse(response.text)
    assert len(events) == 3 and json.loads(events[0]["data"])["quarantine"] == []
    assert [r.exc_info is not None for r in caplog.records if "could not read quarantine" in r.getMessage()
            and r.levelname == "ERROR"] == [True]


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


# -- one snapshot per tick, shared; the stream cap; the broadcaster's life ------------------------------


def _broadcaster_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("tokengate-events:") and not t.done()]


async def _no_broadcaster_task_left() -> None:
    """A stopped broadcaster's task ends within a few loop turns (it is cancelled, not awaited)."""
    for _ in range(20):
        if not _broadcaster_tasks():
            return
        await asyncio.sleep(0)
    assert _broadcaster_tasks() == []


class CountingSnapshots:
    """Wraps live_snapshot: counts the snapshots built and sets an event after each."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.built = 0
        self.event = asyncio.Event()
        real = live_module.live_snapshot

        def counting(coordinator: Any) -> dict[str, Any]:
            self.built += 1
            self.event.set()
            return real(coordinator)

        monkeypatch.setattr(live_module, "live_snapshot", counting)

    async def wait(self) -> None:
        """Wait for the next snapshot to be built (bounded)."""
        self.event.clear()
        await asyncio.wait_for(self.event.wait(), 10)


async def _wait_open(coordinator: Any, count: int) -> None:
    # The requests run as tasks of this loop: give them turns until they subscribed (bounded by turns).
    for _ in range(10_000):
        if open_event_streams(coordinator) == count:
            return
        await asyncio.sleep(0)
    assert open_event_streams(coordinator) == count


async def test_every_stream_shares_one_snapshot_per_tick(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                         auth: dict[str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: a first stream open, and no second tick for an hour
    snapshots = CountingSnapshots(monkeypatch)
    app = make_app(router={"sse_interval": 3600})
    async with serve(app) as client:
        coordinator = app.state.tokengate
        first = asyncio.create_task(client.get(f"{P}/events", headers=auth))
        await snapshots.wait()
        # When: 20 more streams open and read one event each
        others = await asyncio.gather(*(client.get(f"{P}/events", params={"max_events": 1}, headers=auth)
                                        for _ in range(20)))
        # Then: they all got the snapshot already built, byte for byte, and no other was built
        assert snapshots.built == 1
        events = [_parse(r.text)[0] for r in others]
        assert {e["id"] for e in events} == {"0"} and len({e["data"] for e in events}) == 1
        assert all(e["retry"] == "1000" for e in events)
        assert open_event_streams(coordinator) == 1
        # When: the streams are closed (as the lifespan does at shutdown), Then: the first one ends too
        await close_event_streams(coordinator)
        response = await asyncio.wait_for(first, 10)
        assert [e["id"] for e in _parse(response.text)] == ["0"]
        assert open_event_streams(coordinator) == 0
        await _no_broadcaster_task_left()


async def test_streams_past_the_cap_get_503_with_retry_after(make_app: Callable[..., FastAPI],
                                                             serve: Callable[..., Any], auth: dict[str, str]) -> None:
    # Given: a router allowing two streams, both open
    app = make_app(router={"sse_interval": 3600, "sse_max_streams": 2})
    async with serve(app) as client:
        coordinator = app.state.tokengate
        held = [asyncio.create_task(client.get(f"{P}/events", headers=auth)) for _ in range(2)]
        await _wait_open(coordinator, 2)
        # When: a third stream is asked for
        refused = await client.get(f"{P}/events", params={"max_events": 1}, headers=auth)
        # Then: 503 in the common error body, with Retry-After, and no stream was opened for it
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "5"
        body = refused.json()
        assert body["error"] == "overloaded" and "sse_max_streams" in body["detail"] and body["limit"] == 2
        assert open_event_streams(coordinator) == 2
        # an unauthenticated client still gets 401, not a hint about the streams
        assert (await client.get(f"{P}/events")).status_code == 401
        # When: the open streams end, Then: the slots are free again
        await close_event_streams(coordinator)
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await client.get(f"{P}/events", params={"max_events": 1}, headers=auth)).status_code == 200
        assert open_event_streams(coordinator) == 0


async def test_lifespan_shutdown_ends_open_streams(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                   auth: dict[str, str]) -> None:
    # Given: a stream that would otherwise last an hour
    app = make_app(router={"sse_interval": 3600, "sse_max_duration": 3600})
    async with serve(app) as client:
        coordinator = app.state.tokengate
        stream = asyncio.create_task(client.get(f"{P}/events", headers=auth))
        await _wait_open(coordinator, 1)
        assert len(_broadcaster_tasks()) == 1
    # When: the server shuts down (the lifespan exits), Then: the stream ended and no task is left
    response = await asyncio.wait_for(stream, 10)
    assert response.status_code == 200 and len(_parse(response.text)) == 1
    assert open_event_streams(coordinator) == 0
    await _no_broadcaster_task_left()


async def test_the_broadcaster_stops_with_its_last_stream(make_app: Callable[..., FastAPI],
                                                         serve: Callable[..., Any], auth: dict[str, str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = CountingSnapshots(monkeypatch)
    async with serve(make_app()) as client:
        # When: streams open and end, one after another
        for _ in range(3):
            response = await client.get(f"{P}/events", params={"max_events": 2}, headers=auth)
            # Then: each started a fresh broadcaster (its own first tick, not the last stream's snapshot)
            assert [e["id"] for e in _parse(response.text)] == ["0", "1"]
            # and nothing keeps ticking for nobody
            await _no_broadcaster_task_left()
        built = snapshots.built
        for _ in range(5):  # ten ticks' worth of loop turns: a broadcaster left running would build more
            await asyncio.sleep(0.02)
        assert snapshots.built == built


async def test_a_slow_stream_skips_to_the_newest_snapshot(make_app: Callable[..., FastAPI],
                                                         serve: Callable[..., Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = CountingSnapshots(monkeypatch)
    app = make_app()
    async with serve(app):
        coordinator = app.state.tokengate
        streams = LiveStreams(interval=0.01, max_streams=1)
        subscription = streams.subscribe(coordinator)
        frames = subscription.frames(max_events=None, duration=60)
        try:
            first = await asyncio.wait_for(frames.__anext__(), 10)
            assert first.startswith(b"retry: 1000\nevent: stats\nid: 0\n")
            # Given: the stream does not read while three more snapshots are published
            for _ in range(3):
                await snapshots.wait()  # (a snapshot is published in the same loop turn it is built)
            # When: it reads again, Then: it gets the newest one, nothing queued in between
            second = await asyncio.wait_for(frames.__anext__(), 10)
            assert second.startswith(b"event: stats\nid: ")
            assert int(second.split(b"\n")[1].removeprefix(b"id: ")) >= 3
        finally:
            await frames.aclose()
            subscription.close()
            subscription.close()  # idempotent: the slot is given back once
        assert streams.open == 0
        await _no_broadcaster_task_left()


async def test_a_failing_snapshot_is_logged_once_and_the_stream_goes_on(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], auth: dict[str, str],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Given: building a snapshot fails three times, then works
    real = live_module.live_snapshot
    failures = iter(range(3))

    def flaky(coordinator: Any) -> dict[str, Any]:
        if next(failures, None) is not None:
            raise RuntimeError("stats are broken")
        return real(coordinator)

    monkeypatch.setattr(live_module, "live_snapshot", flaky)
    async with serve(make_app()) as client:
        response = await client.get(f"{P}/events", params={"max_events": 1}, headers=auth)
    # Then: the stream got the first snapshot that worked; one traceback, one recovery line
    assert response.status_code == 200 and json.loads(_parse(response.text)[0]["data"])["stats"]["pid"] > 0
    assert caplog.text.count("could not build a snapshot") == 1
    assert "snapshots work again" in caplog.text


async def test_an_idle_stream_sends_keepalive_pings(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                   auth: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: ticks an hour apart, pings every 10 ms, streams of 300 ms
    monkeypatch.setattr(live_module, "SSE_PING_INTERVAL", 0.01)
    app = make_app(router={"sse_interval": 3600, "sse_max_duration": 0.3})
    async with serve(app) as client:
        response = await client.get(f"{P}/events", headers=auth)
    # Then: one event, then comments only (which EventSource ignores), then the end
    assert len(_parse(response.text)) == 1
    assert response.text.count(": ping\n\n") >= 2


async def test_a_stream_open_when_the_coordinator_stops_gets_a_final_snapshot(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], auth: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = CountingSnapshots(monkeypatch)
    app = make_app()
    async with serve(app) as client:
        stream = asyncio.create_task(client.get(f"{P}/events", headers=auth))
        await snapshots.wait()
        # When: the coordinator stops under the open stream
        await app.state.tokengate.aclose()
        response = await asyncio.wait_for(stream, 10)
    # Then: its last event says so, and the stream ended by itself
    events = _parse(response.text)
    assert json.loads(events[-1]["data"])["stats"]["phase"] == "stopped"
    assert all(json.loads(e["data"])["stats"]["phase"] == "running" for e in events[:-1])


def test_snapshots_are_one_line_json_without_nan() -> None:
    encoded = encode_snapshot({"a": float("nan"), "b": [float("inf"), 1.5], "c": "two\nlines", "d": (1, 2)})
    assert b"\n" not in encoded
    assert json.loads(encoded) == {"a": None, "b": [None, 1.5], "c": "two\nlines", "d": [1, 2]}


async def test_stopping_in_the_middle_of_a_fan_out_wakes_every_stream(make_app: Callable[..., FastAPI],
                                                                       serve: Callable[..., Any]) -> None:
    # Given: 200 streams waiting for the next snapshot (more than one wake-up batch)
    app = make_app(router={"sse_interval": 3600})
    async with serve(app):
        broadcaster = live_module._Broadcaster(app.state.tokengate, interval=3600)
        waiting = [asyncio.create_task(broadcaster.next(after=-1, timeout=3600)) for _ in range(200)]
        await asyncio.sleep(0)  # each registers its waiter
        # When: a snapshot is published, and the broadcaster is stopped after the first batch was woken
        publishing = asyncio.create_task(broadcaster._publish(b"{}", final=False))
        await asyncio.sleep(0)  # the first batch (64) is woken; the publisher yields to the loop
        assert not publishing.done()
        publishing.cancel()  # what stop() does to the ticking task
        broadcaster.stop()
        # Then: every stream gets the snapshot now, none waits for its timeout
        done, pending = await asyncio.wait(waiting, timeout=10)
        assert not pending
        assert {t.result().seq for t in done} == {0}
        await asyncio.gather(publishing, return_exceptions=True)
