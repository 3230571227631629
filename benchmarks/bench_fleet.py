"""fleet: what being a fleet member costs a call, measured against the same coordinator without a fleet.

``python -m benchmarks.bench_fleet [--seconds 3] [--repeats 5] [--batch 20000] [--calls 2000] [--http]``

One process, one run, the two set-ups alternated (A B A B ...): a coordinator
without a fleet, and the same coordinator as a member of a fleet (a fleet
directory in a temporary folder, a second member already in it, the admin
API's snapshot parts installed, so it publishes what ``uvicorn --workers N``
would). Each trial starts its coordinator, waits until it has joined,
then measures:

* **fan-out**: batches of ``--batch`` trivial calls gathered at once, for
  ``--seconds`` seconds (long enough to cover several heartbeats and
  snapshots): calls per second;
* **round trip**: ``--calls`` sequential submit → await calls: median µs;

and reports the medians over repeats and their ratio, plus what one snapshot
costs the event loop (``Fleet.last_build_seconds``, once per heartbeat).

``--http`` also runs a real uvicorn (one process, on 127.0.0.1, app
``benchmarks/_fleet_http_app.py``) alternately without and with a fleet
(a second member in this process), and drives ``GET /trivial`` from this
process with ``--clients`` keep-alive connections for ``--seconds`` per trial
(bounded): requests per second and p50/p99 latency. The load generator
shares the 2 cores with the server, so read the ratio, not the rate.

The host is noisy: read ratios within a few per cent as "no measurable
difference"; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tokengate import OperationsCoordinator, task_token_guard
from tokengate.fleet import Fleet

_perf = time.perf_counter


@task_token_guard(operation_type="bench.fleet.noop", tags={"weight": "light"})
def noop() -> None:
    return None


def _coordinator(fleet_dir: Path | None) -> OperationsCoordinator:
    coordinator = OperationsCoordinator(num_cores=2, workers_per_core=4, policies=None, process_workers=0,
                                        name="benchfleet", fleet_dir=fleet_dir, max_pending=1 << 20)
    if coordinator.fleet is not None:
        from tokengate_fastapi.fleet import install_snapshot_parts

        install_snapshot_parts(coordinator)  # publish what a FastAPI server publishes
    return coordinator


async def _trial(fleet_dir: Path | None, seconds: float, batch: int, calls: int) -> dict[str, Any]:
    coordinator = _coordinator(fleet_dir)
    async with coordinator:
        for _ in range(3):  # warm-up
            await asyncio.gather(*[noop() for _ in range(min(batch, 2000))])
        done = 0
        t0 = _perf()
        while _perf() - t0 < seconds:
            await asyncio.gather(*[noop() for _ in range(batch)])
            done += batch
        fan_out = done / (_perf() - t0)
        samples = []
        for _ in range(calls):
            s = _perf()
            await noop()
            samples.append(_perf() - s)
        fleet = coordinator.fleet
        build = None if fleet is None else fleet.last_build_seconds
        members = None if fleet is None else len(fleet.view.members)
    return {"fan_out_per_s": fan_out, "round_trip_p50_us": statistics.median(samples) * 1e6,
            "snapshot_build_s": build, "members": members}


async def main(seconds: float, repeats: int, batch: int, calls: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        fleet_dir = Path(tmp) / "fleet"
        # A second member, as with --workers 2 (started first: calls go to the newest coordinator).
        peer = OperationsCoordinator(num_cores=1, workers_per_core=1, policies=[], process_workers=0,
                                     name="benchfleet", fleet_dir=fleet_dir)
        peer.fleet = Fleet(fleet_dir)
        await peer.astart()
        try:
            runs: dict[str, list[dict[str, Any]]] = {"no fleet": [], "fleet": []}
            for r in range(repeats):
                order = ("no fleet", "fleet") if r % 2 == 0 else ("fleet", "no fleet")
                for name in order:
                    runs[name].append(await _trial(fleet_dir if name == "fleet" else None, seconds, batch, calls))
        finally:
            await peer.aclose()
    summary: dict[str, Any] = {}
    for name, trials in runs.items():
        summary[name] = {
            "fan_out_per_s": statistics.median(t["fan_out_per_s"] for t in trials),
            "round_trip_p50_us": statistics.median(t["round_trip_p50_us"] for t in trials),
            "fan_out_runs": [round(t["fan_out_per_s"]) for t in trials],
            "round_trip_runs_us": [round(t["round_trip_p50_us"], 1) for t in trials],
        }
    builds = [t["snapshot_build_s"] for t in runs["fleet"] if t["snapshot_build_s"]]
    summary["fleet"]["snapshot_build_us"] = round(statistics.median(builds) * 1e6, 1) if builds else None
    summary["fleet"]["members"] = runs["fleet"][-1]["members"]
    summary["ratio_fan_out"] = summary["fleet"]["fan_out_per_s"] / summary["no fleet"]["fan_out_per_s"]
    summary["ratio_round_trip"] = summary["fleet"]["round_trip_p50_us"] / summary["no fleet"]["round_trip_p50_us"]
    return summary


async def _http_trial(fleet_dir: Path | None, seconds: float, clients: int) -> dict[str, Any]:
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TOKENGATE_FLEET_DIR"}
    if fleet_dir is not None:
        env["TOKENGATE_FLEET_DIR"] = str(fleet_dir)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks._fleet_http_app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning", "--no-access-log"],
                            env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10,
                                     limits=httpx.Limits(max_connections=clients)) as client:
            deadline = time.monotonic() + 30
            while True:  # polling another process: there is no event to wait on
                try:
                    if (await client.get("/trivial")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark server did not start")
                await asyncio.sleep(0.05)
            for _ in range(200):  # warm-up
                await client.get("/trivial")
            latencies: list[float] = []
            stop = _perf() + seconds

            async def one_client() -> None:
                while _perf() < stop:
                    s = _perf()
                    response = await client.get("/trivial")
                    latencies.append(_perf() - s)
                    if response.status_code != 200:
                        raise RuntimeError(f"/trivial answered {response.status_code}")

            t0 = _perf()
            await asyncio.gather(*[one_client() for _ in range(clients)])
            elapsed = _perf() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    latencies.sort()
    return {"req_per_s": len(latencies) / elapsed, "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3}


async def http_main(seconds: float, repeats: int, clients: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        fleet_dir = Path(tmp) / "fleet"
        peer = OperationsCoordinator(num_cores=1, workers_per_core=1, policies=[], process_workers=0,
                                     name="benchfleet", fleet_dir=fleet_dir)
        await peer.astart()
        try:
            runs: dict[str, list[dict[str, Any]]] = {"no fleet": [], "fleet": []}
            for r in range(repeats):
                order = ("no fleet", "fleet") if r % 2 == 0 else ("fleet", "no fleet")
                for name in order:
                    runs[name].append(await _http_trial(fleet_dir if name == "fleet" else None, seconds, clients))
        finally:
            await peer.aclose()
    out: dict[str, Any] = {name: {key: statistics.median(t[key] for t in trials) for key in trials[0]}
                           | {"req_per_s_runs": [round(t["req_per_s"]) for t in trials]}
                           for name, trials in runs.items()}
    out["ratio_req_per_s"] = out["fleet"]["req_per_s"] / out["no fleet"]["req_per_s"]
    return out


def _cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--http", action="store_true", help="also the HTTP comparison (a real uvicorn)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (--http)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = asyncio.run(main(args.seconds, args.repeats, args.batch, args.calls))
    http = asyncio.run(http_main(args.seconds, args.repeats, args.clients)) if args.http else None
    if args.json:
        print(json.dumps({"dispatch": result, "http": http}, indent=2))
        return
    print(f"{'':10} {'fan-out calls/s':>16} {'round trip p50 µs':>18}   runs")
    for name in ("no fleet", "fleet"):
        row = result[name]
        print(f"{name:10} {row['fan_out_per_s']:>16,.0f} {row['round_trip_p50_us']:>18.1f}   "
              f"{row['fan_out_runs']} / {row['round_trip_runs_us']}")
    print(f"fleet / no fleet: fan-out {result['ratio_fan_out']:.3f}x, round trip {result['ratio_round_trip']:.3f}x; "
          f"one snapshot costs the loop {result['fleet']['snapshot_build_us']} µs per heartbeat "
          f"({result['fleet']['members']} members)")
    if http is not None:
        print(f"\nhttp GET /trivial, {args.clients} clients   req/s      p50 ms   p99 ms   runs")
        for name in ("no fleet", "fleet"):
            row = http[name]
            print(f"{name:10} {row['req_per_s']:>24,.0f} {row['p50_ms']:>9.2f} {row['p99_ms']:>8.2f}   "
                  f"{row['req_per_s_runs']}")
        print(f"fleet / no fleet: {http['ratio_req_per_s']:.3f}x requests per second")


if __name__ == "__main__":
    _cli()
