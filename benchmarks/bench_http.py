"""http: bulkhead isolation and end-to-end requests/s through a real uvicorn server.

Two servers run side by side as subprocesses on 127.0.0.1 (``_http_server``):
the TokenGate app (``async def`` endpoints awaiting decorated functions) and a
plain FastAPI app (``def`` endpoints on anyio's default pool, its limiter set
to the same total thread count). The heavy flood comes from a third process
(``_http_flood``), so its client-side work does not delay the probes, which
this process times. Per repeat, interleaved (tokengate, plain):

1. **isolation** (issue 5 item 7): sequential ``/light`` probes, spread
   evenly over a fixed window, on an idle server (idle p50/p99); then
   ``clients`` concurrent clients flood ``/heavy`` (``time.sleep(heavy_ms)``)
   and the probes run again over a fixed flood window (flood p50/p99); heavy
   completions in that window give heavy throughput. The flood is then
   stopped and we wait (bounded) until the server reports its pool idle.
2. **end-to-end req/s**: ``concurrency`` connections hammer ``/trivial`` — with wrk
   (a native load generator, installed by ``make bench``) when it is on PATH, else
   httpx clients, whose own CPU cost caps what they can measure
   (TokenGate: awaits a trivial token; plain: a ``def`` endpoint), bounded in
   count and time; also server CPU per request and the client's CPU share
   (a share near 1.0 means the Python load generator, not the server, is the
   bottleneck and the ratio says little).

Thread budget: with N domains × W workers, heavy may use every worker except
the bulkhead reserve (1) on each domain it does not own: 2 × W gives heavy
2W − 1 threads against the plain app's 2W, so the expected heavy ratio is
(2W − 1) / 2W (0.95 at the default W = 10).

Targets: heavy throughput ≥ 0.9× plain; TokenGate light p99 under flood ≤ 3×
its idle p99 and ≥ 20× better than the plain app's under flood; req/s ≥ 1.0×.
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
from ._http_proc import Flood, Server
from ._report import TableData, new_figure, progress, render, save_figure, targets_table

__all__ = ["run"]

NAME = "http"
KINDS = ("tokengate", "plain")
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


async def _probes(client: httpx.AsyncClient, max_n: int, start: float, seconds: float
                  ) -> tuple[list[float], list[float], int]:
    """Sequential probes spread over *seconds*: one slot every seconds/max_n (a slow probe delays the next).

    Each slot sends ``/light`` (a thread hop: the bulkhead under test), then
    ``/ping`` (``async def``, no thread: a control that shows how long the
    server's event loop alone takes to answer). Bounded by *max_n* slots and
    by the window's end (a slot started inside the window may finish).
    Returns (light latencies in s, ping latencies in s, errors).
    """
    out: list[float] = []
    ping: list[float] = []
    errors = 0
    interval = seconds / max(1, max_n)
    deadline = start + seconds
    k = 0
    while k < max_n and _perf() < deadline:
        wait = start + k * interval - _perf()
        if wait > 0:
            await asyncio.sleep(wait)
        k += 1
        for path, sink in (("/light", out), ("/ping", ping)):
            t0 = _perf()
            try:
                r = await client.get(path)
                if r.status_code == 200:
                    sink.append(_perf() - t0)
                else:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
    return out, ping, errors


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


async def _isolation(server: Server, cfg: dict[str, Any]) -> dict[str, Any]:
    heavy_s = cfg["heavy_ms"] / 1000
    warmup = max(0.5, 4 * heavy_s)  # let the queues fill before the window opens
    max_seconds = warmup + cfg["flood_seconds"] + 60.0
    cap = int(max_seconds / heavy_s) + 10  # count bound for each flood client
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0, verify=_SSL) as probe:
        await _probes(probe, 10, _perf(), 0.2)  # warm-up, not recorded
        idle, idle_ping, idle_err = await _probes(probe, cfg["probes"], _perf(), cfg["idle_seconds"])
        flood = Flood(server.url, cfg["clients"], max_seconds, cap)
        try:
            await flood.start()
            await asyncio.sleep(warmup)
            cpu0 = server.cpu_seconds()
            m0, t0 = time.monotonic(), _perf()
            under, under_ping, under_err = await _probes(probe, cfg["probes"], t0, cfg["flood_seconds"])
            await asyncio.sleep(max(0.0, t0 + cfg["flood_seconds"] - _perf()))  # the window is a fixed time
            m1, t1 = time.monotonic(), _perf()
            cpu1 = server.cpu_seconds()
            stats = (await probe.get("/stats")).json()
            flooded = await flood.stop()
        finally:
            flood.kill()
        waited = await _wait_idle(probe, server.kind, 60.0)
    in_window = sum(1 for t in flooded["completions"] if m0 <= t <= m1)
    return {"idle": idle, "flood": under, "idle_ping": idle_ping, "flood_ping": under_ping, "probe_errors": idle_err + under_err, "heavy_errors": flooded["errors"],
            "heavy_per_s": in_window / (t1 - t0), "window_s": t1 - t0, "server_cpu_s": cpu1 - cpu0,
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


async def _measure(options: BenchOptions, cfg: dict[str, Any], repeats: int, result: dict[str, Any]) -> None:
    servers = {k: Server(k, cfg, options.out) for k in KINDS}
    iso: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    rps: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    try:
        for s in servers.values():
            s.start()
        health = {k: await s.wait_ready(30.0) for k, s in servers.items()}
        result["results"]["apps"] = health
        with progress(options.progress, repeats * 2 * len(KINDS), "http phases") as advance:
            for _r in range(repeats):
                for k in KINDS:
                    iso[k].append(await _isolation(servers[k], cfg))
                    advance(1)
                for k in KINDS:
                    wrk = shutil.which("wrk")
                    rps[k].append(await (_rps_wrk(servers[k], cfg, wrk) if wrk else _rps(servers[k], cfg)))
                    advance(1)
    finally:
        for s in servers.values():
            s.stop()
    out_iso: dict[str, dict[str, Any]] = {}
    for k in KINDS:
        runs = iso[k]
        out_iso[k] = {
            "idle": _ms([x for r in runs for x in r["idle"]]),
            "flood": _ms([x for r in runs for x in r["flood"]]),
            "idle_ping": _ms([x for r in runs for x in r["idle_ping"]]),
            "flood_ping": _ms([x for r in runs for x in r["flood_ping"]]),
            "heavy_per_s": median(r["heavy_per_s"] for r in runs),
            "runs_heavy_per_s": [r["heavy_per_s"] for r in runs],
            "probe_errors": sum(r["probe_errors"] for r in runs),
            "heavy_errors": sum(r["heavy_errors"] for r in runs),
            "server_cpu_s_in_window": [r["server_cpu_s"] for r in runs],
            "drain_wait_s": [r["drain_wait_s"] for r in runs],
            "server_stats_under_flood": runs[-1]["server_stats_under_flood"],
        }
        out_iso[k]["light_p99_flood_vs_idle"] = ratio(out_iso[k]["flood"]["p99_ms"], out_iso[k]["idle"]["p99_ms"])
        out_iso[k]["ping_p99_flood_vs_idle"] = ratio(out_iso[k]["flood_ping"]["p99_ms"],
                                                     out_iso[k]["idle_ping"]["p99_ms"])
    out_rps: dict[str, dict[str, Any]] = {k: {"rps": median(r["rps"] for r in rps[k]), "runs": rps[k],
                   "load_generator": rps[k][0].get("load_generator", "httpx") if rps[k] else None,
                   "server_cpu_us_per_request": median(r["server_cpu_us_per_request"] for r in rps[k]),
                   "client_cpu_share": median(r["client_cpu_share"] for r in rps[k])} for k in KINDS}
    tg, plain = out_iso["tokengate"], out_iso["plain"]
    result["results"].update(isolation=out_iso, e2e=out_rps, ratios={
        "heavy_throughput_tokengate_vs_plain": ratio(tg["heavy_per_s"], plain["heavy_per_s"]),
        "tokengate_light_p99_flood_vs_idle": tg["light_p99_flood_vs_idle"],
        "plain_light_p99_flood_vs_idle": plain["light_p99_flood_vs_idle"],
        "light_p99_under_flood_plain_over_tokengate": ratio(plain["flood"]["p99_ms"], tg["flood"]["p99_ms"]),
        "e2e_rps_tokengate_vs_plain": ratio(out_rps["tokengate"]["rps"], out_rps["plain"]["rps"]),
        "e2e_server_cpu_per_request_tokengate_vs_plain": ratio(out_rps["tokengate"]["server_cpu_us_per_request"],
                                                               out_rps["plain"]["server_cpu_us_per_request"]),
    })
    result["contenders"] = {k: {"threads": health[k]["total_threads"], "lifespan": health[k]["lifespan"],
                                **({"heavy_threads": health[k]["routing_max_workers"]["heavy"]}
                                   if k == "tokengate" else {"limiter_total_tokens": health[k]["limiter_total_tokens"]})}
                            for k in KINDS}


def _config(options: BenchOptions) -> dict[str, Any]:
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {
        "num_cores": cores,
        "workers_per_core": int(options.size("workers_per_core", 10, 10)),
        "clients": int(options.size("clients", 100, 100)),
        "heavy_ms": int(options.size("heavy_ms", 200, 200)),
        "flood_seconds": float(options.size("flood_seconds", 12.0, 3.0)),
        "idle_seconds": float(options.size("idle_seconds", 6.0, 2.0)),
        "probes": int(options.size("probes", 300, 40)),
        "concurrency": 32,
        "e2e_requests": int(options.size("e2e_requests", 6000, 600)),
        "e2e_seconds": float(options.size("e2e_seconds", 8.0, 2.0)),
        "lifespan": str(options.sizes.get("lifespan", "auto")),
    }


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the http benchmark; print its tables, write JSON, Markdown and PNG; return the result."""
    cfg = _config(options)
    repeats = options.reps(2, 1)
    result = new_result(NAME, options, {**cfg, "repeats": repeats})
    asyncio.run(_measure(options, cfg, repeats, result))
    result["notes"] += [
        "servers are separate uvicorn processes (asyncio loop, h11) on 127.0.0.1; the heavy flood comes from a "
        "separate httpx process; probes and the req/s load come from httpx in this process; all on one machine",
        "probe latencies are pooled over repeats for the percentiles; throughputs are medians over repeats",
        f"thread budget: plain = {cfg['num_cores']}x{cfg['workers_per_core']} threads; tokengate heavy may use "
        "every worker except the bulkhead reserve on domains it does not own",
        "each probe slot sends /light (thread hop) then /ping (async def, no thread): ping's latency is the "
        "server event loop's own share, a control for the light probe's tail",
        "client_cpu_share near 1.0 means the Python load generator saturates a CPU: req/s is then client-bound",
        "one httpx.AsyncClient (one connection) per simulated client: a shared pool of 100 connections throttled "
        "the generator to ~100 req/s",
        "routes use response_model=None in both apps: with a return annotation FastAPI validates a def endpoint's "
        "result in a second thread-pool hop, which in the plain app queues behind the flood",
    ]
    r = result["results"]["ratios"]
    targets = [
        Target("heavy throughput, tokengate vs plain", r["heavy_throughput_tokengate_vs_plain"], 0.9, ">="),
        Target("tokengate light p99: flood vs idle", r["tokengate_light_p99_flood_vs_idle"], 3.0, "<="),
        Target("light p99 under flood: plain ÷ tokengate", r["light_p99_under_flood_plain_over_tokengate"], 20.0,
               ">="),
        Target("end-to-end req/s, tokengate vs plain def", r["e2e_rps_tokengate_vs_plain"], 1.0, ">="),
    ]
    final = finish(result, targets)
    write_result(final, options.out)
    _report(final, options)
    return final


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    res = result["results"]
    iso, e2e = res["isolation"], res["e2e"]
    cfg = result["config"]
    t1 = TableData(f"http isolation: {cfg['clients']} clients flooding a {cfg['heavy_ms']} ms blocking endpoint",
                   ["app", "threads", "light idle p50 ms", "idle p99 ms", "flood p50 ms", "flood p99 ms",
                    "p99 flood/idle", "probes idle/flood", "heavy req/s", "errors", "ping idle p99",
                    "ping flood p99"])
    for k in KINDS:
        c = result["contenders"][k]
        threads = f"{c['threads']} (heavy {c['heavy_threads']})" if k == "tokengate" else str(c["threads"])
        i = iso[k]
        t1.add(k, threads, i["idle"]["p50_ms"], i["idle"]["p99_ms"], i["flood"]["p50_ms"], i["flood"]["p99_ms"],
               i["light_p99_flood_vs_idle"], f"{i['idle']['n']}/{i['flood']['n']}", i["heavy_per_s"],
               i["probe_errors"] + i["heavy_errors"], i["idle_ping"]["p99_ms"], i["flood_ping"]["p99_ms"])
    t1.caption = ("light = /light, a thread hop (the bulkhead under test); ping = /ping, async def without a "
                  "thread: the server's event loop alone (a control for the loop's own HTTP work)")
    generator = e2e["tokengate"].get("load_generator") or "httpx"
    t2 = TableData(f"http end-to-end: /trivial with {cfg['concurrency']} concurrent {generator} connections",
                   ["app", "req/s", "server CPU µs/req", "client CPU share", "requests"])
    for k in KINDS:
        e = e2e[k]
        t2.add(k, e["rps"], e["server_cpu_us_per_request"], e["client_cpu_share"],
               sum(r["requests"] for r in e["runs"]))
    render([t1, t2, targets_table("http targets", result["targets"])], options.out, NAME, result["machine"],
           console=options.console)
    fig, (ax1, ax2, ax3) = new_figure(3, "http: isolation and req/s", result["machine"], width=4.6)
    xs = range(4)
    for j, k in enumerate(KINDS):
        vals = [iso[k]["idle"]["p50_ms"], iso[k]["idle"]["p99_ms"], iso[k]["flood"]["p50_ms"],
                iso[k]["flood"]["p99_ms"]]
        ax1.bar([x + (j - 0.5) * 0.4 for x in xs], [v or 0 for v in vals], 0.4, label=k)
    ax1.set_xticks(list(xs), ["idle p50", "idle p99", "flood p50", "flood p99"], fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("light probe latency ms (log)")
    ax1.legend(fontsize=8)
    ax2.bar(list(KINDS), [iso[k]["heavy_per_s"] or 0 for k in KINDS])
    ax2.set_ylabel("heavy req/s during flood")
    ax3.bar(list(KINDS), [e2e[k]["rps"] or 0 for k in KINDS])
    ax3.set_ylabel("/trivial req/s")
    save_figure(fig, options.out, NAME)
