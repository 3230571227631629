"""lanes_http: a CPU-bound endpoint on the process lane vs the thread lane, flooded over HTTP (issue 13).

Two uvicorn servers run side by side as subprocesses on 127.0.0.1, identical
but for the lane of their CPU endpoint (this module, ``--serve``):

* ``GET /cpu`` awaits ``spin`` sized to about ``cpu_ms`` (20) ms of one core:
  ``spin_p`` (process lane, heavy) on one server, ``spin_t`` (thread lane,
  heavy) on the other;
* ``GET /light`` awaits a trivial light call on the thread lane (the probe);
* ``GET /ping`` is ``async def`` and offloads nothing (the loop's own floor);
* ``GET /health`` answers 200 once the coordinator is ready (warm processes up);
* ``GET /stats`` counts the ``/cpu`` requests answered.

Both run ``OperationsCoordinator(process_workers=P, warm_processes=True)``
(P = usable CPUs). Per repeat, server after server: **idle** (sequential probes
of ``/light`` and ``/ping`` for ``idle_seconds``), then **flood**: wrk (the http
benchmark's machinery, ``benchmarks._http_wrk``) holds ``clients`` (100)
connections on ``/cpu``; after a warm-up second the same probe client runs for
``flood_seconds`` (at least ``probes`` light samples, bounded by
``max_flood_seconds``), and the CPU endpoint's throughput is the server's own
count over that window. wrk is stopped and the server drained (bounded) before
the next phase.

Targets (issue 13): under the flood, the process-lane server's light p99 ≤ 3×
its idle light p99, and its ``/cpu`` requests/s ≥ 1.7× the thread-lane server's.
Needs wrk (``apt-get install wrk``; ``make bench`` installs it): without it
the benchmark says so and measures nothing. ``TOKENGATE_BENCH_CORE=<checkout>``
makes the servers import that checkout's ``tokengate`` (a before/after run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from ._common import BenchOptions, Target, finish, median, new_result, percentile, ratio, write_result
from ._http_proc import Server, _child_env, free_port  # noqa: F401 - Server's env/port helpers
from ._http_wrk import WrkFlood, find_wrk
from ._report import TableData, render, targets_table

__all__ = ["run"]

NAME = "lanes_http"
LANES = ("process", "thread")
_perf = time.perf_counter


# -- the server (python -m benchmarks.bench_lanes_http --serve ...) ---------------------------------------------


def _make_app(lane: str, arg: int, process_workers: int) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from tokengate import OperationsCoordinator

    from . import _lane_functions as lfn

    cpu = lfn.spin_p if lane == "process" else lfn.spin_t
    state: dict[str, Any] = {"done": 0, "coordinator": None}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with OperationsCoordinator(process_workers=process_workers or None, warm_processes=True,
                                         name=f"http-{lane}") as coordinator:
            state["coordinator"] = coordinator
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/cpu", response_model=None)
    async def cpu_endpoint() -> dict[str, Any]:
        value, _cpu = await cpu(arg)
        state["done"] += 1
        return {"value": value}

    @app.get("/light", response_model=None)
    async def light() -> dict[str, int]:
        return {"sum": await lfn.probe_t()}

    @app.get("/ping", response_model=None)
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/health", response_model=None)
    async def health() -> Any:
        coordinator = state["coordinator"]
        if coordinator is None or not coordinator.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "lane": lane, "arg": arg}

    @app.get("/stats", response_model=None)
    async def stats() -> dict[str, Any]:
        coordinator = state["coordinator"]
        return {"cpu_done": state["done"], "inflight": coordinator.inflight if coordinator else 0}

    return app


def _serve(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--serve", action="store_true")
    p.add_argument("--lane", choices=LANES, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--arg", type=int, required=True)
    p.add_argument("--process-workers", type=int, required=True)
    ns = p.parse_args(argv)
    uvicorn.run(_make_app(ns.lane, ns.arg, ns.process_workers), host="127.0.0.1", port=ns.port,
                log_level="warning", access_log=False)


class _LaneServer(Server):
    """A ``--serve`` subprocess (``Server``'s start, readiness, stop and log, with this module's command line)."""

    def __init__(self, lane: str, cfg: dict[str, Any], out: Path) -> None:
        super().__init__("tokengate", cfg, out, app=f"lanes-{lane}")
        self.lane = lane

    def start(self) -> None:
        import subprocess
        import sys

        from ._http_proc import _REPO

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "benchmarks.bench_lanes_http", "--serve", "--lane", self.lane,
               "--port", str(self.port), "--arg", str(self.cfg["arg"]),
               "--process-workers", str(self.cfg["process_workers"])]
        # TOKENGATE_BENCH_CORE: a checkout whose `tokengate` the servers import instead (a before/after run).
        core = os.environ.get("TOKENGATE_BENCH_CORE") or None
        self.proc = subprocess.Popen(cmd, cwd=_REPO, env=_child_env(core), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        import psutil

        self._ps = psutil.Process(self.proc.pid)


# -- the measurement ------------------------------------------------------------------------------------------


async def _drain(client: httpx.AsyncClient, limit_s: float) -> float:
    """Wait (bounded) until the server has no call in flight; the seconds waited."""
    t0 = _perf()
    while _perf() - t0 < limit_s:
        try:
            if (await client.get("/stats")).json()["inflight"] == 0:
                break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    return _perf() - t0


async def _one_lane(server: _LaneServer, cfg: dict[str, Any], wrk: str) -> dict[str, Any]:
    from .bench_http import _probes

    gap = cfg["probe_gap_ms"] / 1e3
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
        idle_light, idle_ping, idle_err = await _probes(
            client, gap_s=gap, min_seconds=cfg["idle_seconds"], max_seconds=cfg["idle_seconds"] * 4,
            min_light=cfg["probes"] // 2, max_rounds=cfg["max_rounds"])
        flood = WrkFlood(wrk, f"{server.url}/cpu", connections=cfg["clients"], threads=2,
                         max_seconds=cfg["max_flood_seconds"] + 5, timeout_s=30)
        await flood.start()
        try:
            await asyncio.sleep(1.0)  # wrk's connections open and the lane's queues fill
            done0 = (await client.get("/stats")).json()["cpu_done"]
            cpu0 = server.cpu_seconds()
            t0 = _perf()
            light, ping, err = await _probes(
                client, gap_s=gap, min_seconds=cfg["flood_seconds"], max_seconds=cfg["max_flood_seconds"],
                min_light=cfg["probes"], max_rounds=cfg["max_rounds"])
            window = _perf() - t0
            done1 = (await client.get("/stats")).json()["cpu_done"]
            cpu1 = server.cpu_seconds()
        finally:
            wrk_out = await flood.stop()
        drained = await _drain(client, 60.0)
    return {
        "idle": {"light_p50_ms": percentile(idle_light, 50) * 1e3, "light_p99_ms": percentile(idle_light, 99) * 1e3,
                 "ping_p99_ms": percentile(idle_ping, 99) * 1e3, "n": len(idle_light), "errors": idle_err},
        "flood": {"light_p50_ms": percentile(light, 50) * 1e3, "light_p99_ms": percentile(light, 99) * 1e3,
                  "ping_p99_ms": percentile(ping, 99) * 1e3, "n": len(light), "errors": err,
                  "window_s": window, "cpu_requests": done1 - done0, "cpu_rps": (done1 - done0) / window,
                  "server_parent_cpu_s": cpu1 - cpu0, "wrk_requests": wrk_out["requests"],
                  "wrk_errors": wrk_out["errors"]},
        "drain_s": drained,
    }


async def _measure(cfg: dict[str, Any], repeats: int, out: Path, result: dict[str, Any]) -> None:
    wrk = find_wrk()
    res = result["results"]
    if wrk is None:
        res["skipped"] = "wrk is not installed (apt-get install wrk): nothing measured"
        return
    servers = {lane: _LaneServer(lane, cfg, out) for lane in LANES}
    runs: dict[str, list[dict[str, Any]]] = {lane: [] for lane in LANES}
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            await server.wait_ready(120.0)
        for _r in range(repeats):
            for lane, server in servers.items():
                runs[lane].append(await _one_lane(server, cfg, wrk))
    finally:
        for server in servers.values():
            server.stop()
    res["runs"] = runs
    summary: dict[str, Any] = {}
    for lane, rs in runs.items():
        summary[lane] = {
            "idle_light_p99_ms": median([r["idle"]["light_p99_ms"] for r in rs]),
            "flood_light_p99_ms": median([r["flood"]["light_p99_ms"] for r in rs]),
            "flood_ping_p99_ms": median([r["flood"]["ping_p99_ms"] for r in rs]),
            "cpu_rps": median([r["flood"]["cpu_rps"] for r in rs]),
        }
        summary[lane]["light_p99_flood_vs_idle"] = ratio(summary[lane]["flood_light_p99_ms"],
                                                          summary[lane]["idle_light_p99_ms"])
    summary["cpu_rps_process_vs_thread"] = ratio(summary["process"]["cpu_rps"], summary["thread"]["cpu_rps"])
    res["summary"] = summary


def _config(options: BenchOptions) -> dict[str, Any]:
    from .bench_lanes import _calibrate, _usable_cpus
    from ._lane_functions import spin

    cpu_ms = float(options.size("cpu_ms", 20.0, 20.0))
    arg, inline_ms = _calibrate(spin, 100_000, cpu_ms)
    cfg: dict[str, Any] = {
        "clients": int(options.size("clients", 100, 100)),
        "cpu_ms": cpu_ms, "arg": arg, "inline_ms": inline_ms,
        # 0 = the coordinator's default (process_workers=None: 2 per domain, or more to cover the CPUs),
        # what a FastAPI app gets from tokengate_lifespan.
        "process_workers": int(options.size("process_workers", 0, 0)),
        "num_cores": _usable_cpus(), "workers_per_core": 4, "heavy_ms": 0,
        "flood_seconds": float(options.size("flood_seconds", 10.0, 3.0)),
        "max_flood_seconds": float(options.size("max_flood_seconds", 30.0, 6.0)),
        "idle_seconds": float(options.size("idle_seconds", 3.0, 1.0)),
        "probes": int(options.size("probes", 300, 40)),
        "probe_gap_ms": 5.0, "max_rounds": 20_000,
    }
    cfg["max_flood_seconds"] = max(cfg["max_flood_seconds"], cfg["flood_seconds"])
    return cfg


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the benchmark; print its tables, write JSON and Markdown; return the result."""
    cfg = _config(options)
    repeats = options.reps(2, 1)
    result = new_result(NAME, options, {**cfg, "repeats": repeats})
    asyncio.run(_measure(cfg, repeats, options.out, result))
    result["notes"] += [
        "two uvicorn servers (asyncio loop) on 127.0.0.1, identical but for the lane of GET /cpu; the flood is wrk "
        f"({cfg['clients']} connections) on /cpu; probes (sequential /light then /ping, 5 ms apart) run in this "
        "process; all on one machine, so the load generator and the probes share its CPUs with the server",
        f"/cpu = spin({cfg['arg']}), about {cfg['inline_ms']:.1f} ms of one core inline, tagged heavy on both lanes; "
        f"/light = a light thread-lane call; OperationsCoordinator(process_workers={cfg['process_workers']}, "
        "warm_processes=True) in both",
        "figures are medians over repeats (runs has each repeat)",
    ]
    s = result["results"].get("summary")
    targets = [] if s is None else [
        Target("process-lane server: light p99 under the /cpu flood ÷ idle", s["process"]["light_p99_flood_vs_idle"],
               3.0, "<="),
        Target("/cpu requests/s under the flood: process lane ÷ thread lane", s["cpu_rps_process_vs_thread"],
               1.7, ">="),
    ]
    final = finish(result, targets)
    write_result(final, options.out)
    _report(final, options)
    return final


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    res = result["results"]
    tables: list[TableData] = []
    if "summary" in res:
        s = res["summary"]
        t = TableData("lanes_http: CPU endpoint flooded (100 connections), light probes",
                      ["server (lane of /cpu)", "/cpu req/s", "light p99 idle ms", "light p99 flood ms",
                       "flood ÷ idle", "ping p99 flood ms"])
        for lane in LANES:
            r = s[lane]
            t.add(lane, r["cpu_rps"], r["idle_light_p99_ms"], r["flood_light_p99_ms"], r["light_p99_flood_vs_idle"],
                  r["flood_ping_p99_ms"])
        t.caption = f"/cpu req/s process ÷ thread = {s['cpu_rps_process_vs_thread']:.2f}"
        tables.append(t)
    else:
        t = TableData("lanes_http", ["status"])
        t.add(res.get("skipped", "not measured"))
        tables.append(t)
    tables.append(targets_table("lanes_http targets", result["targets"]))
    render(tables, options.out, NAME, result["machine"], console=options.console)


if __name__ == "__main__":
    _serve()
