"""``python -m benchmarks dask``: the Dask lane against raw ``distributed`` on the same cluster, in one run.

One ``LocalCluster`` (2 worker processes, one thread each, loopback only) is
started once; a raw asynchronous ``Client`` and a TokenGate coordinator
(``dask_address`` = that cluster) share it, so every contender pays the same
scheduler and workers. Contenders run interleaved, round by round (medians):

* **start-up**: an embedded cluster (``OperationsCoordinator(warm_dask=True)``)
  vs ``LocalCluster`` + ``Client`` by hand, both with 2 worker processes;
* **round trip**: sequential ``await client.submit(f, x, pure=False)`` vs
  ``await f(x)`` on the Dask lane;
* **fan-out**: N trivial calls gathered: per-call ``client.submit``,
  ``client.map``, the lane's ``gather(*[f(i)])`` (submissions batched per
  burst) and the lane's ``f.map(xs)`` (chunks: one Dask task per chunk);
* **CPU-bound**: 64 pure-Python calls of ~``--cpu-ms`` ms each (the same
  ``spin`` function everywhere): serial in this process, raw ``client.map`` +
  one ``client.gather`` (every result fetched at the end), the same with the
  resource the lane asks for (``heavy=1``: such tasks are not queued on the
  scheduler but sent to the workers at once), raw per-call ``submit`` awaited
  one by one (each result fetched when its task ends, as the lane must), the
  lane (gather of calls). Each trial also records the CPU time of this process
  (client, coordinator and the in-process scheduler) and of the cluster's
  processes: the CPU parallelism a contender got, and what it cost per call
  outside the workers' compute. 7 interleaved rounds, each starting one
  contender later (``--repeats`` wins), a pause between trials so one
  contender's releases land before the next starts; lane / ``client.map`` is
  also given round by round (median, 95 % bootstrap interval, rounds won).

Targets (the issue's): round trip ≤ 1.1× raw submit; fan-out ≥ raw
``client.map``; CPU-bound throughput ≥ raw Dask's. Reported, never asserted.
Bounded: fixed counts per trial and ``repeats`` rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Awaitable, Callable

import psutil

from ._lane_functions import inc as trivial, spin
from ._common import (BenchOptions, Target, finish, interleave, new_result, paired, paired_note, ratio, settle,
                      write_result)
from ._report import TableData, render, targets_table

NAME = "dask"


def _calibrate(ms: float) -> int:
    """Loop count of :func:`spin` that takes about *ms* milliseconds of one core here.

    Timed in this thread's CPU time, not wall time: on a shared host a wall-clock
    calibration that was preempted made the calls much shorter than named (22 ms
    instead of 50 at load 6).
    """
    n = 20_000
    while True:
        t0 = time.thread_time()
        spin(n)
        took = time.thread_time() - t0
        if took > 0.02:
            break
        n *= 2
    for _ in range(4):  # the fastest of 5, as timeit does: a sibling hyperthread's load only slows it
        t0 = time.thread_time()
        spin(n)
        took = min(took, time.thread_time() - t0)
    return max(1000, int(n * ms / 1000 / took))


async def _startup(repeats: int) -> dict[str, list[float]]:
    from distributed import Client, LocalCluster

    from tokengate import OperationsCoordinator

    out: dict[str, list[float]] = {"raw LocalCluster + Client": [], "OperationsCoordinator(warm_dask=True)": []}
    for _, name in interleave(repeats, list(out)):
        t0 = time.perf_counter()
        if name.startswith("raw"):
            cluster = await LocalCluster(n_workers=2, threads_per_worker=1, processes=True, asynchronous=True,
                                         host="127.0.0.1", dashboard_address="127.0.0.1:0")
            client = await Client(cluster, asynchronous=True)
            out[name].append(time.perf_counter() - t0)
            await client.close()
            await cluster.close()
        else:
            coordinator = OperationsCoordinator(num_cores=2, policies=[], warm_dask=True, dask_local_workers=2)
            await coordinator.astart()
            out[name].append(time.perf_counter() - t0)
            await coordinator.aclose()
    return out


def _cluster_cpu(processes: list[psutil.Process]) -> float:
    """CPU seconds (user + system) used so far by the cluster's processes (workers and nannies)."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone: its CPU is no longer counted (the cluster is stable during the trials)
            continue
        total += times.user + times.system
    return total


async def _measure(options: BenchOptions, rt_calls: int, fan_out: int, cpu_calls: int, cpu_n: int,
                   repeats: int, cpu_repeats: int) -> dict[str, Any]:
    from distributed import Client, LocalCluster

    from tokengate import OperationsCoordinator, task_token_guard

    lane_trivial = task_token_guard(operation_type="bench.dask.trivial", tags={"lane": "dask", "weight": "light"})(
        trivial)
    lane_spin = task_token_guard(operation_type="bench.dask.spin", tags={"lane": "dask", "weight": "heavy"})(spin)
    cluster = await LocalCluster(n_workers=2, threads_per_worker=1, processes=True, asynchronous=True,
                                 host="127.0.0.1", dashboard_address="127.0.0.1:0", resources={"heavy": 1, "medium": 1, "light": 1})
    client = await Client(cluster, asynchronous=True)
    coordinator = OperationsCoordinator(num_cores=2, policies=[], dask_address=cluster.scheduler_address,
                                        warm_dask=True)
    await coordinator.astart()
    try:
        # Warm both paths (functions pickled, workers imported) outside the timings.
        for i in range(20):
            await client.submit(trivial, i, pure=False)
            await lane_trivial(i)
        await client.gather(client.map(spin, [1000] * 4, pure=False))
        await asyncio.gather(*[lane_spin(1000) for _ in range(4)])

        async def raw_rt() -> None:
            for i in range(rt_calls):
                await client.submit(trivial, i, pure=False)

        async def lane_rt() -> None:
            for i in range(rt_calls):
                await lane_trivial(i)

        async def raw_submit() -> None:
            await client.gather([client.submit(trivial, i, pure=False) for i in range(fan_out)])

        async def raw_map() -> None:
            await client.gather(client.map(trivial, range(fan_out), pure=False))

        async def lane_gather() -> None:
            await asyncio.gather(*[lane_trivial(i) for i in range(fan_out)])

        async def lane_map() -> None:
            await lane_trivial.map(range(fan_out))

        async def cpu_serial() -> None:
            for _ in range(cpu_calls):
                spin(cpu_n)

        async def cpu_raw() -> None:
            await client.gather(client.map(spin, [cpu_n] * cpu_calls, pure=False))

        async def cpu_raw_resources() -> None:
            await client.gather(client.map(spin, [cpu_n] * cpu_calls, pure=False, resources={"heavy": 1}))

        async def cpu_raw_each() -> None:
            # Each result fetched as its task ends, as the lane must (every token settles on its own).
            await asyncio.gather(*[client.submit(spin, cpu_n, pure=False) for _ in range(cpu_calls)])

        async def cpu_lane() -> None:
            await asyncio.gather(*[lane_spin(cpu_n) for _ in range(cpu_calls)])

        sections: dict[str, dict[str, Callable[[], Awaitable[None]]]] = {
            "round_trip": {"raw client.submit": raw_rt, "lane await f(x)": lane_rt},
            "fan_out": {"raw client.submit": raw_submit, "raw client.map": raw_map,
                        "lane gather(*[f(i)])": lane_gather, "lane f.map(xs)": lane_map},
            "cpu": {"serial (this process)": cpu_serial, "raw client.map": cpu_raw,
                    "raw client.map, resources={'heavy': 1}": cpu_raw_resources,
                    "raw gather(*[await submit])": cpu_raw_each, "lane gather(*[f(i)])": cpu_lane},
        }
        times: dict[str, dict[str, list[float]]] = {s: {n: [] for n in c} for s, c in sections.items()}
        # CPU-bound trials: CPU seconds of this process and of the cluster's processes, per trial.
        cpu_use: dict[str, list[tuple[float, float]]] = {n: [] for n in sections["cpu"]}
        cluster_processes = psutil.Process().children(recursive=True)
        for section, contenders in sections.items():
            rounds = cpu_repeats if section == "cpu" else repeats
            for _, name in interleave(rounds, list(contenders)):
                if section == "cpu":
                    await asyncio.sleep(0.3)  # the previous trial's releases and frees land outside the timing
                    await settle()
                own0, cluster0 = time.process_time(), _cluster_cpu(cluster_processes)
                t0 = time.perf_counter()
                await contenders[name]()
                times[section][name].append(time.perf_counter() - t0)
                if section == "cpu":
                    cpu_use[name].append((time.process_time() - own0, _cluster_cpu(cluster_processes) - cluster0))
        lane_stats = coordinator.stats()["lanes"]["dask"]["cluster"]
    finally:
        await coordinator.aclose()
        await client.close()
        await cluster.close()
    med = {s: {n: statistics.median(v) for n, v in c.items()} for s, c in times.items()}
    return {
        "round_trip_ms": {n: 1000 * t / rt_calls for n, t in med["round_trip"].items()},
        "fan_out_per_s": {n: fan_out / t for n, t in med["fan_out"].items()},
        "cpu_per_s": {n: cpu_calls / t for n, t in med["cpu"].items()},
        # Cores busy on average during a trial: (this process's CPU + the cluster's) / wall, median of trials.
        "cpu_parallelism": {n: statistics.median((own + cl) / wall for (own, cl), wall in zip(use, times["cpu"][n]))
                            for n, use in cpu_use.items()},
        # This process's CPU per call (client, coordinator, in-process scheduler; the serial contender's calls).
        "cpu_own_ms_per_call": {n: statistics.median(1000 * own / cpu_calls for own, _ in use)
                                for n, use in cpu_use.items()},
        "cpu_per_s_trials": {n: [cpu_calls / t for t in v] for n, v in times["cpu"].items()},
        # Lane / raw client.map round by round (the two ran within seconds of each other): noise that
        # drifts over the run cancels here, not in the ratio of the medians.
        "cpu_paired": paired(times["cpu"]["raw client.map"], times["cpu"]["lane gather(*[f(i)])"]),
        "raw_seconds": times,
        "lane_counts": {k: lane_stats[k] for k in ("submitted", "completed", "pushed", "failed", "crashed")},
    }


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the Dask benchmark; print its tables, write JSON and Markdown; return the result."""
    rt_calls = int(options.size("round_trip_calls", 200, 20))
    fan_out = int(options.size("fan_out", 2000, 100))
    cpu_calls = int(options.size("cpu_calls", 64, 8))
    cpu_ms = float(options.size("cpu_ms", 50.0, 5.0))
    repeats = options.reps(3, 1)
    cpu_repeats = options.reps(7, 1)
    startup_repeats = int(options.size("startup_repeats", 2, 1))
    cpu_n = _calibrate(cpu_ms)
    result = new_result(NAME, options, {"round_trip_calls": rt_calls, "fan_out": fan_out, "cpu_calls": cpu_calls,
                                        "cpu_ms": cpu_ms, "cpu_loop": cpu_n, "repeats": repeats,
                                        "cpu_repeats": cpu_repeats,
                                        "cluster": "LocalCluster, 2 worker processes x 1 thread, 127.0.0.1"})
    startup = asyncio.run(_startup(startup_repeats))
    measured = asyncio.run(_measure(options, rt_calls, fan_out, cpu_calls, cpu_n, repeats, cpu_repeats))
    result["results"] = {"startup_s": {n: statistics.median(v) for n, v in startup.items()}, **measured}
    rt = measured["round_trip_ms"]
    fo = measured["fan_out_per_s"]
    cpu = measured["cpu_per_s"]
    targets = [
        Target("round trip: lane / raw client.submit", ratio(rt["lane await f(x)"], rt["raw client.submit"]), 1.1, "<="),
        Target("fan-out: lane gather / raw client.map", ratio(fo["lane gather(*[f(i)])"], fo["raw client.map"]), 1.0,
               ">="),
        Target("fan-out: lane f.map / raw client.map", ratio(fo["lane f.map(xs)"], fo["raw client.map"]), 1.0, ">="),
        Target("CPU-bound: lane / raw client.map", ratio(cpu["lane gather(*[f(i)])"], cpu["raw client.map"]), 1.0,
               ">=", note=paired_note(measured["cpu_paired"])),
    ]
    final = finish(result, targets)
    write_result(final, options.out)
    _report(final, options)
    return final


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    res = result["results"]
    cfg = result["config"]
    t1 = TableData("dask: start-up (2 worker processes)", ["contender", "seconds (median)"])
    for name, value in res["startup_s"].items():
        t1.add(name, value)
    t2 = TableData(f"dask: sequential round trip ({cfg['round_trip_calls']} calls)", ["contender", "ms per call"])
    for name, value in res["round_trip_ms"].items():
        t2.add(name, value)
    t3 = TableData(f"dask: fan-out of {cfg['fan_out']:,} trivial calls", ["contender", "calls/s"])
    for name, value in res["fan_out_per_s"].items():
        t3.add(name, value)
    t4 = TableData(f"dask: {cfg['cpu_calls']} CPU-bound calls of ~{cfg['cpu_ms']} ms "
                   f"({cfg.get('cpu_repeats', cfg['repeats'])} rounds)",
                   ["contender", "calls/s (median)", "each round", "CPU parallelism", "this process's CPU ms/call"])
    for name, value in res["cpu_per_s"].items():
        t4.add(name, value, " ".join(f"{v:.1f}" for v in res["cpu_per_s_trials"][name]),
               res["cpu_parallelism"][name], res["cpu_own_ms_per_call"][name])
    t4.caption = "lane / raw client.map " + paired_note(res["cpu_paired"])
    tables = [t1, t2, t3, t4, targets_table("dask: targets", result["targets"])]
    render(tables, options.out, NAME, result["machine"], console=options.console)
