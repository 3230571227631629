"""http: latency under a saturating flood, heavy throughput and end-to-end req/s through real uvicorn servers.

Three servers run side by side as subprocesses on 127.0.0.1 (``_http_server``):

* ``tokengate``: ``async def`` endpoints awaiting decorated functions,
  ``num_cores × workers_per_core`` worker threads (2 × 20 = 40 on 2 CPUs);
* ``plain``: a plain FastAPI app, ``def`` endpoints on anyio's pool with its
  **default** limiter (40 threads: what a FastAPI user gets);
* ``plain_same``: the same plain app with the limiter set to TokenGate's
  thread count (on 2 CPUs with the default sizes that is 40 as well: then the
  two plain apps are the same configuration, and their difference is noise).

Per repeat, app after app (interleaved):

1. **idle**: one sequential probe client alternates ``GET /light`` (a thread
   hop: a light token / a ``def`` endpoint) and ``GET /ping`` (``async def``,
   offloads nothing: the floor of the app's own event loop), ``probe_gap_ms``
   (5) between rounds, for ``idle_seconds``.
2. **flood**: wrk (``wrk_threads`` = 2, ``connections`` = 100) floods ``/heavy``
   (``time.sleep(heavy_ms / 1000)``, 200 ms); after a warm-up the same probe
   client runs for ``flood_seconds`` (14), longer (up to
   ``max_flood_seconds``) until it has ``probes`` light samples: the plain
   apps answer a light probe about every 300 ms under the flood. Heavy
   throughput is the server's own count of answered ``/heavy`` requests over
   the window; the server's per-thread scheduler figures (``/proc``
   schedstat: CPU, run-queue wait, slices) are taken around the window. wrk
   is stopped (SIGINT) and we wait (bounded) until the server's pool is idle.
   Without wrk the httpx flood generator (``_http_flood``) stands in and the
   result records ``flood_generator: httpx``.
3. **end-to-end req/s**: 32 connections on ``/trivial`` (wrk, or httpx).

Thread budget: with N domains × W workers, heavy may use every worker except
the bulkhead reserve (1) on each domain it does not own: 2 × W gives heavy
2W − 1 threads against ``plain_same``'s 2W.

Targets (issue 17), as ratios of the same run: light p99 under the flood ≥ 20×
better than ``plain``'s (default threads); TokenGate's ``/ping`` p99 under the
flood ≤ 1.25× ``plain``'s (TokenGate's presence must not slow what does not use
it); TokenGate's light p99 under the flood ≤ 2× its own ``/ping`` p99 (a light
call costs little more than the loop's own floor); and, as before, light p99
flood ≤ 3× idle, heavy throughput ≥ 0.9× ``plain_same``, req/s ≥ 1.0×
``plain_same``.
"""

from __future__ import annotations

import asyncio
import math
import re
import resource
import shutil
import ssl
import time
from typing import Any

import httpx

from ._common import BenchOptions, Target, finish, median, new_result, percentile, ratio, write_result
from ._http_proc import Flood, Server, schedstat_delta
from ._http_wrk import WrkFlood, find_wrk
from ._report import TableData, new_figure, progress, render, save_figure, targets_table

__all__ = ["run"]

NAME = "http"
#: app name -> (server kind, plain limiter: None = TokenGate's total, 0 = anyio's default)
APPS: dict[str, tuple[str, int | None]] = {"tokengate": ("tokengate", None), "plain": ("plain", 0),
                                           "plain_same": ("plain", None)}
KINDS = tuple(APPS)
_perf = time.perf_counter


def _ms(samples: list[float]) -> dict[str, Any]:
    return {"n": len(samples), "p50_ms": percentile(samples, 50) * 1e3, "p99_ms": percentile(samples, 99) * 1e3,
            "max_ms": (max(samples) * 1e3) if samples else math.nan}


_SSL = ssl.create_default_context()  # unused for http://, but httpx builds one per client unless given one


def _clients(url: str, n: int, timeout: float) -> list[httpx.AsyncClient]:
    """One client (one connection) per simulated user.

    A single shared AsyncClient would pool all connections, and httpcore's pool
    spends CPU per request in proportion to its size: at 100 connections it
    throttled this generator to ~100 req/s. Separate clients avoid that.
    """
    return [httpx.AsyncClient(base_url=url, timeout=timeout, verify=_SSL) for _ in range(n)]


async def _probes(client: httpx.AsyncClient, *, gap_s: float, min_seconds: float, max_seconds: float,
                  min_light: int, max_rounds: int) -> tuple[list[float], list[float], int]:
    """One sequential probe client: rounds of ``/light`` then ``/ping``, *gap_s* of pause after each round.

    Runs at least *min_seconds*, then until it has *min_light* light samples,
    never past *max_seconds* or *max_rounds* (a round started in time may
    finish). A fixed pause rather than a fixed schedule: a slow answer is not
    followed by a burst of catch-up probes. Returns (light latencies in s, ping
    latencies in s, errors).
    """
    light: list[float] = []
    ping: list[float] = []
    errors = 0
    t0 = _perf()
    rounds = 0
    while rounds < max_rounds:
        elapsed = _perf() - t0
        if elapsed >= max_seconds or (elapsed >= min_seconds and len(light) >= min_light):
            break
        rounds += 1
        for path, sink in (("/light", light), ("/ping", ping)):
            t = _perf()
            try:
                r = await client.get(path)
                if r.status_code == 200:
                    sink.append(_perf() - t)
                else:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
        await asyncio.sleep(gap_s)
    return light, ping, errors


async def _wait_idle(probe: httpx.AsyncClient, kind: str, limit_s: float) -> float:
    """Poll /stats until the server's pool is idle (bounded); return the seconds waited."""
    t0 = _perf()
    while _perf() - t0 < limit_s:
        s = (await probe.get("/stats")).json()
        idle = (s["counts"]["inflight"] == 0) if kind == "tokengate" else (
            s["borrowed_tokens"] == 0 and s["tasks_waiting"] == 0)
        if idle:
            break
        await asyncio.sleep(0.1)
    return _perf() - t0


def _flood(server: Server, cfg: dict[str, Any], max_seconds: float) -> WrkFlood | Flood:
    wrk = find_wrk()
    if wrk:
        return WrkFlood(wrk, f"{server.url}/heavy", connections=cfg["connections"], threads=cfg["wrk_threads"],
                        max_seconds=max_seconds, timeout_s=max(10.0, 20 * cfg["heavy_ms"] / 1000))
    heavy_s = cfg["heavy_ms"] / 1000
    return Flood(server.url, cfg["connections"], max_seconds, int(max_seconds / heavy_s) + 10)


async def _isolation(server: Server, cfg: dict[str, Any]) -> dict[str, Any]:
    heavy_s = cfg["heavy_ms"] / 1000
    warmup = max(0.5, 5 * heavy_s)  # every connection has a request in, the queues are full
    max_seconds = warmup + cfg["max_flood_seconds"] + 30.0
    gap = cfg["probe_gap_ms"] / 1000
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0, verify=_SSL) as probe:
        await _probes(probe, gap_s=gap, min_seconds=0.0, max_seconds=0.5, min_light=10, max_rounds=10)  # warm-up
        idle, idle_ping, idle_err = await _probes(
            probe, gap_s=gap, min_seconds=cfg["idle_seconds"], max_seconds=cfg["idle_seconds"], min_light=0,
            max_rounds=cfg["max_rounds"])
        flood = _flood(server, cfg, max_seconds)
        try:
            await flood.start()
            await asyncio.sleep(warmup)
            done0 = (await probe.get("/stats")).json()["heavy_done"]
            cpu0, sched0, t0 = server.cpu_seconds(), server.schedstat(), _perf()
            under, under_ping, under_err = await _probes(
                probe, gap_s=gap, min_seconds=cfg["flood_seconds"], max_seconds=cfg["max_flood_seconds"],
                min_light=cfg["probes"], max_rounds=cfg["max_rounds"])
            t1, cpu1, sched1 = _perf(), server.cpu_seconds(), server.schedstat()
            stats = (await probe.get("/stats")).json()
            flooded = await flood.stop()
        finally:
            flood.kill()
        waited = await _wait_idle(probe, server.kind, 60.0)
    heavy = stats["heavy_done"] - done0
    answered = heavy + 2 * len(under) + under_err  # what the server answered in the window, roughly
    flooded.pop("completions", None)
    return {"idle": idle, "flood": under, "idle_ping": idle_ping, "flood_ping": under_ping,
            "probe_errors": idle_err + under_err, "heavy_errors": flooded["errors"], "flood_generator": flooded,
            "heavy_per_s": heavy / (t1 - t0), "window_s": t1 - t0, "server_cpu_s": cpu1 - cpu0,
            "server_cpu_us_per_request": (cpu1 - cpu0) / max(1, answered) * 1e6,
            "sched": schedstat_delta(server.proc.pid if server.proc else 0, sched0, sched1, answered)
            if sched0 and sched1 else None,
            "drain_wait_s": waited, "server_stats_under_flood": stats}


async def _rps(server: Server, cfg: dict[str, Any]) -> dict[str, Any]:
    clients = _clients(server.url, cfg["concurrency"], 30.0)

    async def hammer(max_n: int, deadline: float) -> tuple[int, int]:
        issued = ok = errors = 0

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal issued, ok, errors
            while issued < max_n and _perf() < deadline:
                issued += 1
                try:
                    r = await client.get("/trivial")
                    ok += r.status_code == 200
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1

        await asyncio.gather(*[worker(c) for c in clients])
        return ok, errors

    try:
        await hammer(min(300, cfg["e2e_requests"]), _perf() + 5)  # warm-up: connections open
        cpu0, pc0, t0 = server.cpu_seconds(), time.process_time(), _perf()
        ok, errors = await hammer(cfg["e2e_requests"], t0 + cfg["e2e_seconds"])
        elapsed = _perf() - t0
        cpu1, pc1 = server.cpu_seconds(), time.process_time()
    finally:
        await asyncio.gather(*[c.aclose() for c in clients], return_exceptions=True)
    return {"requests": ok, "errors": errors, "elapsed_s": elapsed, "rps": ok / elapsed,
            "server_cpu_us_per_request": (cpu1 - cpu0) / max(1, ok) * 1e6,
            "client_cpu_share": (pc1 - pc0) / elapsed}


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children that have exited and been waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(r.ru_utime + r.ru_stime)


async def _rps_wrk(server: Server, cfg: dict[str, Any], wrk: str) -> dict[str, Any]:
    """End-to-end req/s with wrk, a native load generator, so the server (not the client) is measured.

    The Python client spends ~1 ms of its own CPU per request and saturates a core
    before either server does; wrk costs a few µs per request. ``client_cpu_share``
    is wrk's own CPU (a child process, so not in ``time.process_time()``): the
    children's rusage delta around the run, read once wrk has exited and been reaped.
    """
    seconds = max(2, int(round(cfg["e2e_seconds"])))
    args = [wrk, "-t1", f"-c{cfg['concurrency']}", f"-d{seconds}s", f"{server.url}/trivial"]
    warm = await asyncio.create_subprocess_exec(*args[:3], "-d1s", args[-1], stdout=asyncio.subprocess.DEVNULL)
    await asyncio.wait_for(warm.wait(), 30)
    cpu0, pc0, t0 = server.cpu_seconds(), _children_cpu_seconds(), _perf()
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
    elapsed = _perf() - t0
    cpu1, pc1 = server.cpu_seconds(), _children_cpu_seconds()
    text = out.decode(errors="replace")
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    requests = int(total.group(1)) if total else 0
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock_err.groups()) if sock_err else 0)
    ok = max(0, requests - errors)
    # wrk's Requests/sec counts every response, error ones included; req/s here is successful
    # responses only, as in the httpx path (ok / elapsed).
    return {"requests": ok, "errors": errors, "elapsed_s": elapsed,
            "rps": float(rps.group(1)) * ok / requests if rps and requests else 0.0, "load_generator": "wrk",
            "server_cpu_us_per_request": (cpu1 - cpu0) / max(1, requests) * 1e6,
            "client_cpu_share": (pc1 - pc0) / elapsed}


def _spread(runs: list[dict[str, Any]], key: str) -> list[float]:
    """The p99 in ms of *key*'s samples in each repeat (the run-to-run spread of the pooled figure)."""
    return [percentile(r[key], 99) * 1e3 for r in runs]


async def _measure(options: BenchOptions, cfg: dict[str, Any], repeats: int, result: dict[str, Any]) -> None:
    apps = [a for a in cfg["apps"] if a in APPS]
    servers = {a: Server(APPS[a][0], cfg, options.out, app=a, threads=APPS[a][1]) for a in apps}
    iso: dict[str, list[dict[str, Any]]] = {a: [] for a in apps}
    rps: dict[str, list[dict[str, Any]]] = {a: [] for a in apps}
    try:
        for s in servers.values():
            s.start()
        health = {a: await s.wait_ready(30.0) for a, s in servers.items()}
        result["results"]["apps"] = health
        with progress(options.progress, repeats * 2 * len(apps), "http phases") as advance:
            for _r in range(repeats):
                for a in apps:
                    iso[a].append(await _isolation(servers[a], cfg))
                    advance(1)
                for a in apps:
                    wrk = shutil.which("wrk")
                    rps[a].append(await (_rps_wrk(servers[a], cfg, wrk) if wrk else _rps(servers[a], cfg)))
                    advance(1)
    finally:
        for s in servers.values():
            s.stop()
    out_iso: dict[str, dict[str, Any]] = {}
    for a in apps:
        runs = iso[a]
        out_iso[a] = {
            "idle": _ms([x for r in runs for x in r["idle"]]),
            "flood": _ms([x for r in runs for x in r["flood"]]),
            "idle_ping": _ms([x for r in runs for x in r["idle_ping"]]),
            "flood_ping": _ms([x for r in runs for x in r["flood_ping"]]),
            "runs_flood_p99_ms": _spread(runs, "flood"),
            "runs_flood_ping_p99_ms": _spread(runs, "flood_ping"),
            "runs_idle_p99_ms": _spread(runs, "idle"),
            "heavy_per_s": median(r["heavy_per_s"] for r in runs),
            "runs_heavy_per_s": [r["heavy_per_s"] for r in runs],
            "probe_errors": sum(r["probe_errors"] for r in runs),
            "heavy_errors": sum(r["heavy_errors"] for r in runs),
            "flood_generator": [r["flood_generator"] for r in runs],
            "window_s": [r["window_s"] for r in runs],
            "server_cpu_s_in_window": [r["server_cpu_s"] for r in runs],
            "server_cpu_us_per_request_in_window": median(r["server_cpu_us_per_request"] for r in runs),
            "sched_in_window": [r["sched"] for r in runs],
            "drain_wait_s": [r["drain_wait_s"] for r in runs],
            "server_stats_under_flood": runs[-1]["server_stats_under_flood"],
        }
        o = out_iso[a]
        o["light_p99_flood_vs_idle"] = ratio(o["flood"]["p99_ms"], o["idle"]["p99_ms"])
        o["ping_p99_flood_vs_idle"] = ratio(o["flood_ping"]["p99_ms"], o["idle_ping"]["p99_ms"])
        o["light_p99_over_own_ping_p99_flood"] = ratio(o["flood"]["p99_ms"], o["flood_ping"]["p99_ms"])
    out_rps: dict[str, dict[str, Any]] = {a: {"rps": median(r["rps"] for r in rps[a]), "runs": rps[a],
                   "load_generator": rps[a][0].get("load_generator", "httpx") if rps[a] else None,
                   "server_cpu_us_per_request": median(r["server_cpu_us_per_request"] for r in rps[a]),
                   "client_cpu_share": median(r["client_cpu_share"] for r in rps[a])} for a in apps}

    def get(app: str, *keys: str) -> float:
        d: Any = out_iso.get(app)
        for k in keys:
            d = None if d is None else d.get(k)
        return math.nan if d is None else float(d)

    same = "plain_same" if "plain_same" in out_iso else "plain"
    result["results"].update(isolation=out_iso, e2e=out_rps, ratios={
        "light_p99_under_flood_plain_over_tokengate": ratio(get("plain", "flood", "p99_ms"),
                                                            get("tokengate", "flood", "p99_ms")),
        "light_p99_under_flood_plain_same_over_tokengate": ratio(get("plain_same", "flood", "p99_ms"),
                                                                 get("tokengate", "flood", "p99_ms")),
        "ping_p99_under_flood_tokengate_vs_plain": ratio(get("tokengate", "flood_ping", "p99_ms"),
                                                         get("plain", "flood_ping", "p99_ms")),
        "ping_p99_under_flood_tokengate_vs_plain_same": ratio(get("tokengate", "flood_ping", "p99_ms"),
                                                              get("plain_same", "flood_ping", "p99_ms")),
        "tokengate_light_p99_over_own_ping_p99_flood": get("tokengate", "light_p99_over_own_ping_p99_flood"),
        "tokengate_light_p99_flood_vs_idle": get("tokengate", "light_p99_flood_vs_idle"),
        "plain_light_p99_flood_vs_idle": get("plain", "light_p99_flood_vs_idle"),
        "heavy_throughput_tokengate_vs_plain_same": ratio(get("tokengate", "heavy_per_s"), get(same, "heavy_per_s")),
        "heavy_throughput_tokengate_vs_plain": ratio(get("tokengate", "heavy_per_s"), get("plain", "heavy_per_s")),
        "e2e_rps_tokengate_vs_plain_same": ratio(out_rps.get("tokengate", {}).get("rps"),
                                                 out_rps.get(same, {}).get("rps")),
        "e2e_server_cpu_per_request_tokengate_vs_plain_same": ratio(
            out_rps.get("tokengate", {}).get("server_cpu_us_per_request"),
            out_rps.get(same, {}).get("server_cpu_us_per_request")),
    })
    result["contenders"] = {a: {"threads": health[a]["total_threads"], "lifespan": health[a]["lifespan"],
                                **({"heavy_threads": health[a]["routing_max_workers"]["heavy"]}
                                   if APPS[a][0] == "tokengate" else {"limiter_total_tokens": health[a]["limiter_total_tokens"]})}
                            for a in apps}


def _config(options: BenchOptions) -> dict[str, Any]:
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    apps = options.sizes.get("apps", KINDS)
    if isinstance(apps, str):
        apps = tuple(a.strip() for a in apps.split(",") if a.strip())
    unknown = sorted(set(apps) - set(APPS))
    if unknown or "tokengate" not in apps:
        raise ValueError(f"apps must include 'tokengate' and come from {list(APPS)}; got {list(apps)}")
    cfg: dict[str, Any] = {
        "apps": list(apps),
        "num_cores": cores,
        "workers_per_core": int(options.size("workers_per_core", 20, 10)),
        "connections": int(options.size("clients", 100, 100)),
        "wrk_threads": int(options.size("wrk_threads", 2, 2)),
        "heavy_ms": int(options.size("heavy_ms", 200, 200)),
        "flood_seconds": float(options.size("flood_seconds", 14.0, 3.0)),
        "max_flood_seconds": float(options.size("max_flood_seconds", 40.0, 4.0)),
        "idle_seconds": float(options.size("idle_seconds", 4.0, 1.0)),
        "probes": int(options.size("probes", 300, 20)),
        "probe_gap_ms": float(options.size("probe_gap_ms", 5.0, 5.0)),
        "max_rounds": int(options.size("max_rounds", 20_000, 2_000)),
        "concurrency": 32,
        "e2e_requests": int(options.size("e2e_requests", 6000, 600)),
        "e2e_seconds": float(options.size("e2e_seconds", 8.0, 2.0)),
        "lifespan": str(options.sizes.get("lifespan", "auto")),
    }
    cfg["max_flood_seconds"] = max(cfg["max_flood_seconds"], cfg["flood_seconds"])
    cfg["wrk_threads"] = max(1, min(cfg["wrk_threads"], cfg["connections"]))
    return cfg


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the http benchmark; print its tables, write JSON, Markdown and PNG; return the result."""
    cfg = _config(options)
    repeats = options.reps(2, 1)
    result = new_result(NAME, options, {**cfg, "repeats": repeats})
    asyncio.run(_measure(options, cfg, repeats, result))
    generators = {g["generator"] for a in result["results"]["isolation"].values() for g in a["flood_generator"]}
    result["config"]["flood_generator"] = ",".join(sorted(generators))
    result["notes"] += [
        "servers are separate uvicorn processes (asyncio loop, h11) on 127.0.0.1; the heavy flood is wrk "
        f"({cfg['wrk_threads']} threads, {cfg['connections']} connections) when installed, else the httpx flood "
        "process; probes and the httpx fallbacks run in this process; all on one machine",
        "probe latencies are pooled over repeats for the percentiles (runs_* give each repeat's p99: the spread); "
        "throughputs are medians over repeats",
        f"apps: tokengate = {cfg['num_cores']}x{cfg['workers_per_core']} worker threads; plain = anyio's default "
        "limiter (40); plain_same = the limiter at TokenGate's thread count",
        "each probe round sends /light (thread hop) then /ping (async def, no offload: the server event loop's "
        f"own floor), then pauses {cfg['probe_gap_ms']} ms",
        "sched_in_window: /proc schedstat of the server's threads over the flood window (loop thread = main "
        "thread); run-queue wait is CPU contention, GIL waits are not in it",
        "routes use response_model=None in both apps: with a return annotation FastAPI validates a def endpoint's "
        "result in a second thread-pool hop, which in the plain app queues behind the flood",
    ]
    r = result["results"]["ratios"]
    targets = [
        Target("light p99 under flood: plain (default threads) ÷ tokengate",
               r["light_p99_under_flood_plain_over_tokengate"], 20.0, ">="),
        Target("no-offload async def p99 under flood: tokengate ÷ plain", r["ping_p99_under_flood_tokengate_vs_plain"],
               1.25, "<="),
        Target("tokengate light p99 ÷ its own no-offload p99, under flood",
               r["tokengate_light_p99_over_own_ping_p99_flood"], 2.0, "<="),
        Target("tokengate light p99: flood vs idle", r["tokengate_light_p99_flood_vs_idle"], 3.0, "<="),
        Target("heavy throughput, tokengate vs plain at the same threads",
               r["heavy_throughput_tokengate_vs_plain_same"], 0.9, ">="),
        Target("end-to-end req/s, tokengate vs plain def (same threads)", r["e2e_rps_tokengate_vs_plain_same"],
               1.0, ">="),
    ]
    final = finish(result, targets)
    write_result(final, options.out)
    _report(final, options)
    return final


def _fmt_spread(values: list[float]) -> str:
    good = [v for v in values if not math.isnan(v)]
    if not good:
        return "–"
    return f"{min(good):.3g}–{max(good):.3g}" if len(good) > 1 else f"{good[0]:.3g}"


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    res = result["results"]
    iso, e2e = res["isolation"], res["e2e"]
    cfg = result["config"]
    apps = list(iso)
    t1 = TableData(f"http latency under a flood: {cfg['flood_generator']}, {cfg['connections']} connections on a "
                   f"{cfg['heavy_ms']} ms blocking endpoint",
                   ["app", "threads", "light idle p50 ms", "idle p99", "flood p50", "flood p99",
                    "flood p99 per repeat", "ping idle p99", "ping flood p50", "ping flood p99",
                    "ping p99 per repeat", "samples light/ping (flood)", "heavy req/s", "errors"])
    for a in apps:
        c = result["contenders"][a]
        threads = f"{c['threads']} (heavy {c['heavy_threads']})" if "heavy_threads" in c else str(c["threads"])
        i = iso[a]
        t1.add(a, threads, i["idle"]["p50_ms"], i["idle"]["p99_ms"], i["flood"]["p50_ms"], i["flood"]["p99_ms"],
               _fmt_spread(i["runs_flood_p99_ms"]), i["idle_ping"]["p99_ms"], i["flood_ping"]["p50_ms"],
               i["flood_ping"]["p99_ms"], _fmt_spread(i["runs_flood_ping_p99_ms"]),
               f"{i['flood']['n']}/{i['flood_ping']['n']}", i["heavy_per_s"], i["probe_errors"] + i["heavy_errors"])
    t1.caption = ("light = /light, a thread hop (TokenGate: a light token; plain: a def endpoint); ping = /ping, "
                  "async def offloading nothing: the app's own event-loop floor. plain = anyio's default 40 "
                  "threads; plain_same = TokenGate's thread count")
    t_sched = TableData("server threads in the flood window (/proc schedstat, per answered request)",
                        ["app", "loop CPU µs", "loop run-queue wait µs", "loop slices", "other threads CPU µs",
                         "other run-queue wait µs", "other slices", "process CPU µs/req"])
    for a in apps:
        sch = [x for x in iso[a]["sched_in_window"] if x]
        if not sch:
            continue
        lo = {k: median(x["loop_thread"][k] for x in sch) for k in sch[0]["loop_thread"]}
        ot = {k: median(x["other_threads"][k] for x in sch) for k in sch[0]["other_threads"]}
        t_sched.add(a, lo["cpu_us_per_request"], lo["runqueue_wait_us_per_request"], lo["slices_per_request"],
                    ot["cpu_us_per_request"], ot["runqueue_wait_us_per_request"], ot["slices_per_request"],
                    iso[a]["server_cpu_us_per_request_in_window"])
    generator = next(iter(e2e.values())).get("load_generator") or "httpx"
    t2 = TableData(f"http end-to-end: /trivial with {cfg['concurrency']} concurrent {generator} connections",
                   ["app", "req/s", "server CPU µs/req", "client CPU share", "requests"])
    for a in apps:
        e = e2e[a]
        t2.add(a, e["rps"], e["server_cpu_us_per_request"], e["client_cpu_share"],
               sum(r["requests"] for r in e["runs"]))
    tables = [t1] + ([t_sched] if t_sched.rows else []) + [t2, targets_table("http targets", result["targets"])]
    render(tables, options.out, NAME, result["machine"], console=options.console)
    fig, (ax1, ax2, ax3) = new_figure(3, "http: latency under a flood, heavy and end-to-end req/s",
                                      result["machine"], width=4.6)
    labels = ["light idle p99", "light flood p50", "light flood p99", "ping flood p99"]
    xs = range(len(labels))
    width = 0.8 / max(1, len(apps))
    for j, a in enumerate(apps):
        vals = [iso[a]["idle"]["p99_ms"], iso[a]["flood"]["p50_ms"], iso[a]["flood"]["p99_ms"],
                iso[a]["flood_ping"]["p99_ms"]]
        ax1.bar([x + (j - (len(apps) - 1) / 2) * width for x in xs], [v or 0 for v in vals], width, label=a)
    ax1.set_xticks(list(xs), labels, fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("probe latency ms (log)")
    ax1.legend(fontsize=8)
    ax2.bar(apps, [iso[a]["heavy_per_s"] or 0 for a in apps])
    ax2.set_ylabel("heavy req/s during flood")
    ax3.bar(apps, [e2e[a]["rps"] or 0 for a in apps])
    ax3.set_ylabel("/trivial req/s")
    save_figure(fig, options.out, NAME)
