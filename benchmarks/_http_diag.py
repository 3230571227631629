"""A/B diagnostics for the http benchmark's flood: which piece of the server makes the tail.

``python -m benchmarks._http_diag VARIANT [VARIANT ...] [--rounds R] [--seconds S]``

Each VARIANT is ``label:kind[:option=value,...]`` with options ``core=PATH``
(a checkout whose ``tokengate`` this server imports: a patched copy of the
core), ``threads=N`` (plain: limiter tokens, 0 = anyio's default),
``switch=SECONDS`` (the server's ``sys.setswitchinterval``: a diagnostic, never
a fix), ``wpc=N`` (TokenGate workers per core), ``policies=none`` (TokenGate
without its default policies), ``heavy=anyio`` (TokenGate's ``/heavy`` as a
``def`` endpoint: the flood bypasses the coordinator), ``jitter=J`` (each
``/heavy`` sleeps 200 ms × uniform(1 − J, 1 + J): durations vary as real ones
do). ``--ping-only`` probes
``/ping`` alone (the loop's floor, with as many samples for a plain app as for
TokenGate; the benchmark itself always alternates). Every variant's server starts
at once; then, round after round, each in turn gets the same wrk flood
(100 connections, 2 threads, on ``/heavy``) while the sequential probe client
alternates ``/light`` and ``/ping``: the variants share the machine's noise.
Per round and variant it prints light and ping p50/p99, heavy req/s and the
loop thread's schedstat figures; then the pooled figures.

Optionally ``--py-spy PATH`` records the first variant's server for
``--py-spy-seconds`` during its first flood (``py-spy record --gil
--nonblocking --threads --format raw`` at 200 Hz, into
``<out>/pyspy-<label>.txt``): which thread holds the GIL, doing what. A
blocking py-spy at 1,000 Hz stops the server often enough to wreck the round
it samples. Servers listen on 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from ._common import percentile
from ._http_proc import Server, schedstat_delta
from ._http_wrk import WrkFlood, find_wrk

__all__ = ["main"]

_perf = time.perf_counter


def _parse_variant(text: str) -> dict[str, Any]:
    parts = text.split(":", 2)
    if len(parts) < 2 or parts[1] not in ("tokengate", "plain"):
        raise SystemExit(f"bad variant {text!r}: use label:tokengate|plain[:option=value,...]")
    opts: dict[str, str] = {}
    if len(parts) == 3 and parts[2]:
        for kv in parts[2].split(","):
            k, _, v = kv.partition("=")
            opts[k] = v
    return {"label": parts[0], "kind": parts[1], **opts}


_PATHS: tuple[str, ...] = ("/light", "/ping")


async def _probe(client: httpx.AsyncClient, seconds: float, gap: float) -> tuple[list[float], list[float]]:
    light: list[float] = []
    ping: list[float] = []
    end = _perf() + seconds
    for _ in range(100_000):
        if _perf() >= end:
            break
        for path in _PATHS:
            sink = light if path == "/light" else ping
            t = _perf()
            r = await client.get(path)
            if r.status_code == 200:
                sink.append(_perf() - t)
        await asyncio.sleep(gap)
    return light, ping


async def _one(server: Server, seconds: float, out: Path, spy: str | None, spy_seconds: float) -> dict[str, Any]:
    wrk = find_wrk()
    assert wrk, "wrk is needed (scripts/ensure-debian-package.sh wrk wrk ...)"
    flood = WrkFlood(wrk, f"{server.url}/heavy", connections=100, threads=2, max_seconds=seconds + 30)
    spy_proc: subprocess.Popen[bytes] | None = None
    async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
        await _probe(client, 0.3, 0.005)
        try:
            await flood.start()
            await asyncio.sleep(1.0)
            done0 = (await client.get("/stats")).json()["heavy_done"]
            s0, t0 = server.schedstat(), _perf()
            if spy and server.proc is not None:
                spy_proc = subprocess.Popen(
                    [spy, "record", "--pid", str(server.proc.pid), "--duration", str(int(spy_seconds)),
                     "--rate", "200", "--nonblocking", "--format", "raw", "--threads", "--gil",
                     "--output", str(out / f"pyspy-{server.app}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            light, ping = await _probe(client, seconds, 0.005)
            s1, t1 = server.schedstat(), _perf()
            done1 = (await client.get("/stats")).json()["heavy_done"]
            w = await flood.stop()
        finally:
            flood.kill()
            if spy_proc is not None:
                spy_proc.wait(timeout=spy_seconds + 30)
        for _ in range(600):  # the flood's queued requests drain (bounded: 60 s)
            st = (await client.get("/stats")).json()
            if st.get("counts", {}).get("inflight", 0) == 0 and st.get("borrowed_tokens", 0) == 0:
                break
            await asyncio.sleep(0.1)
        times = [t for t in (await client.get("/heavy_times")).json()["times"]]
    heavy = done1 - done0
    answered = heavy + 2 * len(light)
    return {"light": light, "ping": ping, "heavy_per_s": heavy / (t1 - t0), "wrk_errors": w["errors"],
            "bunching": _bunching(times),
            "sched": schedstat_delta(server.proc.pid if server.proc else 0, s0, s1, answered) if s0 else None}


def _bunching(times: list[float], width: float = 0.005) -> float:
    """Median number of other /heavy completions within *width* seconds of each one: 0-1 when they
    are spread evenly (195/s), tens when they come in waves."""
    times = sorted(times)
    counts = []
    j0 = 0
    for i, t in enumerate(times):
        while times[j0] < t - width:
            j0 += 1
        j1 = i
        while j1 + 1 < len(times) and times[j1 + 1] <= t + width:
            j1 += 1
        counts.append(j1 - j0)
    return float(sorted(counts)[len(counts) // 2]) if counts else math.nan


def _fmt(xs: list[float]) -> str:
    return f"p50 {percentile(xs, 50) * 1e3:6.2f} p99 {percentile(xs, 99) * 1e3:7.2f} (n={len(xs)})"


async def _run(ns: argparse.Namespace) -> None:
    variants = [_parse_variant(v) for v in ns.variants]
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    servers: dict[str, Server] = {}
    for v in variants:
        env = {name: v[key] for key, name in (("switch", "BENCH_HTTP_SWITCH_INTERVAL"),
                                              ("policies", "BENCH_HTTP_POLICIES"), ("heavy", "BENCH_HTTP_HEAVY"),
                                              ("jitter", "BENCH_HTTP_HEAVY_JITTER"))
               if v.get(key)}
        cfg = {"num_cores": 2, "workers_per_core": int(v.get("wpc", 20)), "heavy_ms": 200, "lifespan": "auto"}
        threads = int(v["threads"]) if "threads" in v else None
        servers[v["label"]] = Server(v["kind"], cfg, out, app=v["label"], threads=threads,
                                     core_path=v.get("core"), env=env)
    pooled: dict[str, dict[str, list[Any]]] = {v["label"]: {"light": [], "ping": [], "heavy": [], "p99s": []}
                                               for v in variants}
    try:
        for s in servers.values():
            s.start()
        for label, s in servers.items():
            h = await s.wait_ready(60.0)
            print(f"{label}: {h['kind']} threads={h['total_threads']} tokengate={h['tokengate_file']}", flush=True)
        for r in range(ns.rounds):
            for i, v in enumerate(variants):
                label = v["label"]
                res = await _one(servers[label], ns.seconds, out, ns.py_spy if (r == 0 and i == 0) else None,
                                 ns.py_spy_seconds)
                p = pooled[label]
                p["light"] += res["light"]
                p["ping"] += res["ping"]
                p["heavy"].append(res["heavy_per_s"])
                p["p99s"].append((percentile(res["light"], 99) * 1e3, percentile(res["ping"], 99) * 1e3))
                lo = res["sched"]["loop_thread"] if res["sched"] else {}
                ot = res["sched"]["other_threads"] if res["sched"] else {}
                print(f"round {r} {label:>12}: light {_fmt(res['light'])} | ping {_fmt(res['ping'])} | "
                      f"heavy {res['heavy_per_s']:5.1f}/s bunch {res['bunching']:4.1f} | loop cpu {lo.get('cpu_us_per_request', math.nan):5.0f}us "
                      f"rq-wait {lo.get('runqueue_wait_us_per_request', math.nan):5.0f}us "
                      f"slices {lo.get('slices_per_request', math.nan):4.2f} | others cpu "
                      f"{ot.get('cpu_us_per_request', math.nan):5.0f}us rq-wait "
                      f"{ot.get('runqueue_wait_us_per_request', math.nan):5.0f}us slices "
                      f"{ot.get('slices_per_request', math.nan):4.2f}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    print("pooled:")
    summary = {}
    for label, p in pooled.items():
        print(f"  {label:>12}: light {_fmt(p['light'])} | ping {_fmt(p['ping'])} | heavy "
              f"{sorted(p['heavy'])[len(p['heavy']) // 2]:5.1f}/s | per-round p99 light/ping "
              + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in p["p99s"]))
        summary[label] = {"light_p99_ms": percentile(p["light"], 99) * 1e3,
                          "ping_p99_ms": percentile(p["ping"], 99) * 1e3, "rounds_p99_ms": p["p99s"]}
    (out / "diag.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks._http_diag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=14.0, help="probe window per flood")
    p.add_argument("--out", default="bench-results/diag")
    p.add_argument("--py-spy", default=None, help="path of py-spy: record the first variant's first flood")
    p.add_argument("--py-spy-seconds", type=float, default=10.0)
    p.add_argument("--ping-only", action="store_true", help="probe /ping alone")
    ns = p.parse_args(argv)
    if ns.ping_only:
        global _PATHS
        _PATHS = ("/ping",)
    asyncio.run(_run(ns))


if __name__ == "__main__":
    main()
