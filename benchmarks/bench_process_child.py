"""The process lane's engine room against the process pools people use today.

Run from a checkout: ``python benchmarks/bench_process_child.py`` (``--quick``
for tiny sizes; ``--json PATH`` to keep the numbers). Bounded: every section
has a fixed number of calls and the whole run stops adding rounds after
``--max-seconds``.

What it measures, in one run, contenders interleaved round by round (medians):

* **round trip**: sequential calls of a trivial function (``x + 1``):
  ``ChildProcess.call()`` from a plain thread (the engine's floor), the same
  awaited from asyncio through a one-thread executor (what the coordinator's
  process-lane worker will add), ``anyio.to_process.run_sync``, and
  ``loop.run_in_executor`` on a ``ProcessPoolExecutor`` (forkserver).
* **batch**: 100,000 trivial calls through ``ChildProcess.call_batch`` (one
  process), ``ProcessPoolLane.call_batch``/``call_many`` (all processes), and
  ``ProcessPoolExecutor.map`` at several chunk sizes (forkserver).
* **start-up**: ``ChildProcess.start()`` and ``ProcessPoolLane.start()``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make the checkout importable (workers inherit sys.path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._process_functions import inc  # noqa: E402
from tokengate.lanes import ChildProcess, ProcessPoolLane, preload_in_forkserver, reference_to  # noqa: E402


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _round_trips(calls: int, rounds: int, deadline: float, workers: int) -> dict[str, list[float]]:
    import anyio.to_process

    loop = asyncio.get_running_loop()
    ref = reference_to(inc)
    handle = ChildProcess(name="bench-child")
    handle.start()
    hop = concurrent.futures.ThreadPoolExecutor(1)
    ppe = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    try:
        # Warm every contender (processes started, modules imported) outside the timings.
        for i in range(50):
            handle.call(ref, (i,))
            await loop.run_in_executor(hop, handle.call, ref, (i,))
            await anyio.to_process.run_sync(inc, i)
            await loop.run_in_executor(ppe, inc, i)

        async def child_call() -> None:
            for i in range(calls):
                handle.call(ref, (i,))

        async def child_call_via_thread() -> None:
            for i in range(calls):
                await loop.run_in_executor(hop, handle.call, ref, (i,))

        async def anyio_to_process() -> None:
            for i in range(calls):
                await anyio.to_process.run_sync(inc, i)

        async def ppe_run_in_executor() -> None:
            for i in range(calls):
                await loop.run_in_executor(ppe, inc, i)

        contenders: dict[str, Callable[[], Any]] = {
            "ChildProcess.call (sync thread)": child_call,
            "ChildProcess.call awaited via 1-thread executor": child_call_via_thread,
            "anyio.to_process.run_sync": anyio_to_process,
            "run_in_executor(ProcessPoolExecutor forkserver)": ppe_run_in_executor,
        }
        results: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            for name, run in contenders.items():
                started = time.perf_counter()
                await run()
                results[name].append((time.perf_counter() - started) / calls * 1e6)
        return results
    finally:
        handle.close()
        hop.shutdown()
        ppe.shutdown()


def _batches(n: int, rounds: int, deadline: float, workers: int) -> dict[str, list[float]]:
    ref = reference_to(inc)
    items = [((i,), None) for i in range(n)]
    expected_last = n
    handle = ChildProcess(name="bench-batch")
    handle.start()
    lane = ProcessPoolLane(workers, name="bench-lane")
    lane.start()
    ppe = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
    try:
        list(ppe.map(inc, range(1000), chunksize=100))  # start its workers outside the timings
        lane.call_batch(ref, items[:1000])
        handle.call_batch(ref, items[:1000])

        def check(values: list[Any]) -> None:
            assert len(values) == n and values[-1] == expected_last, "wrong results"

        contenders: dict[str, Callable[[], None]] = {
            "ChildProcess.call_batch (1 process, chunks of 1024)": lambda: check(
                handle.call_batch(ref, items).results()),
            f"ProcessPoolLane({workers}).call_batch (default chunks)": lambda: check(
                lane.call_batch(ref, items).results()),
            f"ProcessPoolLane({workers}).call_batch (chunks of 5000)": lambda: check(
                lane.call_batch(ref, items, chunksize=5000).results()),
            f"ProcessPoolLane({workers}).call_many (Outcome per item)": lambda: check(
                [o.unwrap() for o in lane.call_many(ref, items)]),
        }
        for chunksize in (100, 1000, 5000):
            contenders[f"ProcessPoolExecutor({workers}).map(chunksize={chunksize})"] = (
                lambda c=chunksize: check(list(ppe.map(inc, range(n), chunksize=c))))  # type: ignore[misc]
        results: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            for name, run in contenders.items():
                started = time.perf_counter()
                run()
                results[name].append(n / (time.perf_counter() - started))
        return results
    finally:
        handle.close()
        lane.stop()
        ppe.shutdown()


def _startups(repeats: int, workers: int) -> dict[str, list[float]]:
    child: list[float] = []
    for i in range(repeats):
        handle = ChildProcess(name=f"bench-start-{i}")
        try:
            child.append(handle.start())
        finally:
            handle.close()
    pool_wall: list[float] = []
    for i in range(max(1, repeats // 2)):
        lane = ProcessPoolLane(workers, name=f"bench-start-pool-{i}")
        started = time.perf_counter()
        lane.start()
        pool_wall.append(time.perf_counter() - started)
        lane.stop()
    return {"ChildProcess.start() s": child, f"ProcessPoolLane({workers}).start() wall s": pool_wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--calls", type=int, default=None, help="sequential calls per round (default 2000)")
    parser.add_argument("--batch", type=int, default=None, help="calls per batch (default 100000)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="processes in the pools (default 2)")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="stop adding rounds after this long")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--preload-forkserver", action="store_true",
                        help="call tokengate.lanes.preload_in_forkserver() first (workers start without importing "
                             "tokengate)")
    args = parser.parse_args(argv)
    calls = args.calls or (200 if args.quick else 2000)
    batch = args.batch or (10_000 if args.quick else 100_000)
    rounds = args.rounds or (2 if args.quick else 5)
    if args.preload_forkserver:
        preload_in_forkserver()
    began = time.monotonic()
    deadline = began + args.max_seconds

    startup = _startups(2 if args.quick else 6, args.workers)
    trips = asyncio.run(_round_trips(calls, rounds, deadline, args.workers))
    batches = _batches(batch, rounds, deadline, args.workers)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# process lane engine room — Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"start method forkserver{' (tokengate preloaded)' if args.preload_forkserver else ''}, load {load}")
    print(f"\n## Sequential round trip, trivial call ({calls} calls x {len(next(iter(trips.values())))} rounds)\n")
    print("| contender | median µs per call | min | max |\n|---|---|---|---|")
    for name, values in trips.items():
        print(f"| {name} | {_median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")
    print(f"\n## Batch of {batch:,} trivial calls\n")
    print("| contender | median calls/s | min | max |\n|---|---|---|---|")
    for name, values in batches.items():
        print(f"| {name} | {_median(values):,.0f} | {min(values):,.0f} | {max(values):,.0f} |")
    print("\n## Start-up\n")
    print("| what | median s | min | max |\n|---|---|---|---|")
    for name, values in startup.items():
        print(f"| {name} | {_median(values):.3f} | {min(values):.3f} | {max(values):.3f} |")
    ppe_best = max(_median(v) for k, v in batches.items() if k.startswith("ProcessPoolExecutor"))
    lane_best = max(_median(v) for k, v in batches.items() if k.startswith("ProcessPoolLane"))
    anyio_rt = _median(trips["anyio.to_process.run_sync"])
    print("\n## Ratios\n")
    print(f"* batch: best ProcessPoolLane / best ProcessPoolExecutor.map = {lane_best / ppe_best:.2f}x")
    for name in ("ChildProcess.call (sync thread)", "ChildProcess.call awaited via 1-thread executor"):
        print(f"* round trip: {name} / anyio.to_process = {_median(trips[name]) / anyio_rt:.2f}x the time")
    print(f"\n(total {time.monotonic() - began:.1f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"round_trip_us": trips, "batch_calls_per_s": batches,
                                         "startup_s": startup, "load": load}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
