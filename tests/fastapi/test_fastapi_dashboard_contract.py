"""The dashboard's field contract: what the page reads is what the admin API documents and really sends.

The page declares every field it reads in one JSON block
(``<script type="application/json" id="tokengate-api-fields">``). These tests
check three things, so renaming or dropping a field on either side fails here:

* the page's code reads exactly the declared fields (parsed from its render
  functions), so the declaration cannot drift from the code;
* every declared field is a property of the matching admin schema in the
  OpenAPI document (``QuarantineRecord``, ``OperationReputation``, ...);
* every declared field is present in real answers (REST and ``/events``) of
  an app running the real policies, not hand-written fakes.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from fastapi import FastAPI

import tokengate_fastapi
from tokengate import (ConductorPolicy, RetryPolicy, StickyPolicy, StorageTierPolicy, TokenQuarantined,
                       task_token_guard)
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.policies.reputation import ReputationPolicy

import _fastapi_process_functions as pf

P = "/tokengate"
DASHBOARD = Path(tokengate_fastapi.__file__).parent / "static" / "dashboard.html"

#: The admin schema (OpenAPI component) each kind of object the page reads is documented by.
#: "counts" (a dict of counters), "events" (the stream's payload) and the policies' own sections
#: ("sticky", "sticky_pin": a policy's stats() is not an admin schema) have none: real answers only.
SCHEMAS = {
    "stats": "StatsResponse",
    "latency": "LatencySummary",
    "core": "CoreInfo",
    "worker": "WorkerInfo",
    "lane": "LaneInfo",
    "process_worker": "WorkerInfo",
    "process": "ProcessInfo",
    "cluster": "ClusterInfo",
    "cluster_worker": "ClusterWorker",
    "history": "ExecutionRecord",
    "operation": "OperationReputation",
    "operation_run_time": "OperationRunTime",
    "quarantine": "QuarantineRecord",
    "series": "SeriesResponse",
    "series_latency": "SeriesPercentiles",
    "series_refusals": "SeriesRefusals",
}

#: In each function of the page, which expressions hold which kind of object ("s.run_time" is a latency).
READERS: dict[str, dict[str, str]] = {
    "render": {"msg": "events", "stats": "stats"},
    "renderHeader": {"s": "stats"},
    "renderCounts": {"c": "counts"},
    "pair": {"summary": "latency"},
    "renderLatency": {"s": "stats", "s.run_time": "latency"},
    "renderPending": {"s": "stats"},
    "renderCores": {"s": "stats", "c": "core", "w": "worker"},
    "renderProcesses": {"s": "stats", "lane": "lane", "c": "core", "pw": "process_worker", "p": "process"},
    "renderCluster": {"s": "stats", "cl": "cluster", "cw": "cluster_worker"},
    "renderHistory": {"r": "history", "a": "history", "b": "history"},
    "renderOperations": {"o": "operation", "rt": "operation_run_time"},
    "renderQuarantine": {"q": "quarantine"},
    "renderSticky": {"st": "sticky", "k": "sticky_pin"},
    "renderSeries": {"d": "series", "d.queue_wait": "series_latency", "d.run_time": "series_latency"},
}


def declared_fields(html: str | None = None) -> dict[str, list[str]]:
    """The page's declared fields, by kind."""
    html = DASHBOARD.read_text(encoding="utf-8") if html is None else html
    block = re.search(r'<script type="application/json" id="tokengate-api-fields">(.*?)</script>', html, re.S)
    assert block is not None, "the dashboard no longer declares the fields it reads"
    fields: dict[str, list[str]] = json.loads(block.group(1))
    return fields


def _function_body(script: str, name: str) -> str:
    start = script.index("{", script.index(f"function {name}("))
    depth = 0
    for end in range(start, len(script)):
        depth += {"{": 1, "}": -1}.get(script[end], 0)
        if depth == 0:
            return script[start:end + 1]
    raise AssertionError(f"unbalanced braces in {name}()")


def fields_read_by_the_code(html: str | None = None) -> dict[str, set[str]]:
    """Every ``<expression>.<field>`` the page's render functions read, by kind (per READERS)."""
    html = DASHBOARD.read_text(encoding="utf-8") if html is None else html
    script = re.findall(r"<script>(.*?)</script>", html, re.S)[0]
    unmapped = set(re.findall(r"\bfunction (render\w*)\(", script)) - set(READERS)
    assert not unmapped, f"map the new render functions in READERS: {sorted(unmapped)}"
    read: dict[str, set[str]] = {}
    for function, expressions in READERS.items():
        body = _function_body(script, function)
        found = 0
        for expression, kind in expressions.items():
            names = re.findall(rf"(?<![\w.]){re.escape(expression)}\??\.([A-Za-z_]\w*)", body)
            read.setdefault(kind, set()).update(names)
            found += len(names)
        assert found, f"{function}() reads none of {sorted(expressions)}: update READERS"
    # the count cards come from a table of keys
    counts_table = re.search(r"const COUNTS = \[(.*?)\];", script, re.S)
    assert counts_table is not None
    read["counts"].update(re.findall(r'\["(\w+)", "[^"]*"\]', counts_table.group(1)))
    # so do the refusal kinds of the history charts
    refusals_table = re.search(r"const REFUSALS = \[(.*?)\];", script, re.S)
    assert refusals_table is not None
    read.setdefault("series_refusals", set()).update(re.findall(r'\["(\w+)", "[^"]*"\]', refusals_table.group(1)))
    return read


def test_the_page_reads_exactly_the_fields_it_declares() -> None:
    declared = {kind: set(names) for kind, names in declared_fields().items()}
    assert fields_read_by_the_code() == declared


def test_the_parser_sees_a_field_the_code_reads_but_does_not_declare() -> None:
    # Given: a page whose quarantine rendering reads one more field than it declares
    html = DASHBOARD.read_text(encoding="utf-8").replace("row.reason.textContent = q.reason",
                                                          "row.reason.textContent = q.reason_text")
    # Then: the comparison above would fail
    assert "reason_text" in fields_read_by_the_code(html)["quarantine"]
    assert "reason_text" not in declared_fields(html)["quarantine"]


def test_every_declared_field_is_in_the_admin_schemas(make_app: Callable[..., FastAPI]) -> None:
    components = make_app().openapi()["components"]["schemas"]
    declared = declared_fields()
    assert set(SCHEMAS) <= set(declared)
    for kind, schema in SCHEMAS.items():
        properties = set(components[schema]["properties"])
        missing = set(declared[kind]) - properties
        assert not missing, f"the dashboard reads {sorted(missing)} of {kind}, which {schema} does not document"


def test_the_dashboard_s_admin_calls_exist(make_app: Callable[..., FastAPI]) -> None:
    # the routes and methods the page calls: api(method, path) and the event stream
    paths = make_app().openapi()["paths"]
    html = DASHBOARD.read_text(encoding="utf-8")
    calls = set(re.findall(r'api\("(GET|POST|DELETE)", "(/[a-z/]+)"', html))
    calls |= set(re.findall(r'act\("[^"]+", "(GET|POST|DELETE)", "(/[a-z]+)"', html))
    calls |= {("POST", "/quarantine/{quarantine_id}/release"), ("DELETE", "/quarantine/{quarantine_id}"),
              ("GET", "/events")}
    assert {("GET", "/stats"), ("GET", "/ready"), ("POST", "/drain"), ("GET", "/history/series")} <= calls
    for method, path in calls:
        assert method.lower() in paths[P + path], (method, path)
    assert 'act("Release " + id, "POST", path + "/release"' in html and 'act("Discard " + id, "DELETE", path' in html


# -- real answers, real policies -----------------------------------------------------------------------


@task_token_guard(operation_type="contract.square", tags={"weight": "light", "sticky_anchor": "sq"})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="contract.fails", tags={"weight": "light", "retries": 1, "retry_backoff": 0.001})
def fails(x: int) -> int:
    raise KeyError(x)


_sticky_gate = threading.Event()


@task_token_guard(operation_type="contract.sticky", tags={"weight": "light", "sticky_key": "account", "ordered": True})
def sticky_wait(account: str, amount: int) -> int:
    _sticky_gate.wait(10)  # bounded: the test sets it right after its reads
    return amount


def _objects(kind: str, answer: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The objects of *kind* inside a /events payload (or the same shapes from REST answers)."""
    stats = answer["stats"]
    if kind == "events":
        yield answer
    elif kind == "stats":
        yield stats
    elif kind == "counts":
        yield stats["counts"]
    elif kind == "latency":
        yield from (stats["queue_wait"], stats["run_time"])
    elif kind == "core":
        yield from stats["cores"]
        yield from (core for lane in stats["lanes"].values() for core in lane["cores"])
    elif kind == "worker":
        yield from (w for core in stats["cores"] for w in core["workers"])
    elif kind == "lane":
        yield from stats["lanes"].values()
    elif kind == "process_worker":
        yield from (w for core in stats["lanes"]["process"]["cores"] for w in core["workers"])
    elif kind == "process":
        yield from (w["process"] for core in stats["lanes"]["process"]["cores"] for w in core["workers"])
    elif kind == "cluster":
        yield stats["lanes"]["dask"]["cluster"]
    elif kind == "cluster_worker":
        yield from stats["lanes"]["dask"]["cluster"]["workers"]
    elif kind == "history":
        yield from answer["history"]
    elif kind == "operation":
        yield from answer["operations"]
    elif kind == "operation_run_time":
        yield from (row["run_time"] for row in answer["operations"])
    elif kind == "quarantine":
        yield from answer["quarantine"]
    elif kind == "sticky":
        yield stats["policies"]["sticky"]
    elif kind == "sticky_pin":
        yield from stats["policies"]["sticky"]["listed"]
    elif kind == "series":
        yield answer["series"]
    elif kind == "series_latency":
        yield from (answer["series"]["queue_wait"], answer["series"]["run_time"])
    elif kind == "series_refusals":
        yield answer["series"]["refusals"]
    else:
        raise AssertionError(f"no real answer for {kind!r}: add it here")


@pytest.mark.anyio
async def test_real_answers_have_every_field_the_dashboard_reads(make_app: Callable[..., FastAPI],
                                                                 serve: Callable[..., Any], auth: dict[str, str],
                                                                 tmp_path: Path) -> None:
    policies = [ReputationPolicy(), QuarantinePolicy(str(tmp_path / "q.sqlite3")), StickyPolicy(),
                ConductorPolicy(), StorageTierPolicy(), RetryPolicy()]
    app = make_app(policies=policies, process_workers=1)
    async with serve(app) as client:
        # Given: a worker process up (started with the server), and a call it ran
        for _ in range(600):  # bounded: about 30 s
            if (await client.get(f"{P}/ready")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert isinstance(await pf.worker_pid(), int)
        # completed, retried-then-failed and quarantined calls
        assert list(await asyncio.gather(*(square(i) for i in range(3)))) == [0, 1, 4]
        with pytest.raises(KeyError):
            await fails(1)
        app.state.tokengate.policy("quarantine").hold("contract.square")
        with pytest.raises(TokenQuarantined):
            await square(9)
        # and an ordered call of one account running while the page's sources are read
        _sticky_gate.clear()
        in_flight = sticky_wait("acct-7", 1)
        # When: the page's two sources are read: the REST answers it renders, and one stream event
        rest = {"stats": (await client.get(f"{P}/stats", headers=auth)).json(),
                "history": (await client.get(f"{P}/history", params={"limit": 20}, headers=auth)).json(),
                "operations": (await client.get(f"{P}/operations", headers=auth)).json(),
                "quarantine": (await client.get(f"{P}/quarantine", params={"status": "pending"},
                                                headers=auth)).json(),
                "series": (await client.get(f"{P}/history/series", headers=auth)).json()}
        stream = (await client.get(f"{P}/events", params={"max_events": 1}, headers=auth)).text
        _sticky_gate.set()
        assert await in_flight == 1
    event = json.loads(next(line for line in stream.splitlines() if line.startswith("data: "))[len("data: "):])
    # Then: every declared field is in every object of its kind, in both
    for source, answer in (("REST", rest), ("/events", event)):
        for kind, names in declared_fields().items():
            if kind == "events" and source == "REST":
                continue
            if kind.startswith("series") and source == "/events":
                continue  # the charts poll GET /history/series; the stream does not carry the series
            if kind.startswith("cluster"):
                continue  # needs a Dask cluster: tests/fastapi/test_fastapi_dask_cluster.py checks these kinds
            objects = list(_objects(kind, answer))
            assert objects, (source, kind)  # the scenario produced at least one of each
            for obj in objects:
                missing = set(names) - set(obj)
                assert not missing, f"{source} {kind} lacks {sorted(missing)}: {obj}"
