"""lanes: the process lane against the process pools people use today, and against the thread lane.

Everything runs in one process, on one event loop, against one coordinator
``OperationsCoordinator(process_workers=P, warm_processes=True)`` (P = usable
CPUs unless ``--process-workers``), with every anchor's pool of the same size
(P processes) started and warmed **before** any timing: start-up is measured
on its own and never billed to throughput. Contenders are interleaved, each
round starting one contender later (A B C, B C A, ...), and medians reported,
as ratios measured side by side.

Sections:

* **start-up**: coordinator start → ``coordinator.ready`` (every worker
  process up), on fresh coordinators; each process's own start-up seconds.
* **CPU-bound**: N calls (default 64) of a ~20 ms pure-Python function
  gathered at once: a bare loop and the seeds' ``cpu_crunch`` / ``data_sort``
  / ``hash_chain``, each sized at run time to about 20 ms of one core. Process
  lane vs the same function on the thread lane (target ≥ 1.8× on 2 cores; the
  limit is 2.0×) and vs ``run_in_executor`` on ``ProcessPoolExecutor``
  (forkserver) (target ≥ 1×). Each call returns its own CPU time, so the
  cores each contender really used (Σ call CPU ÷ wall) are reported: on a busy
  host they show that a ratio measured nothing. A fourth contender, the same
  lane with its pull across domains switched off (each call runs on the
  process it was routed to when submitted), shows what the pull is worth.
  7 rounds (``--repeats`` wins); beside the ratio of medians, the ratio round
  by round (its median, a 95 % bootstrap interval, rounds won): contenders
  bound by the same cores differ by a few per cent, less than the host's
  drift over a run. One more target pools every workload's pairs (4 × 7):
  process lane vs PPE on pure-Python CPU work as a whole, the median of the
  pairs, with an interval narrow enough to read.
* **trivial fan-out**: 20,000 ``x + 1`` calls gathered: process lane vs
  ``run_in_executor`` on ``ProcessPoolExecutor`` (target ≥ 5×); the thread
  lane is shown for scale.
* **round trip**: sequential ``await`` of a trivial call: process lane vs
  ``anyio.to_process.run_sync`` (target ≤ 1× its median).
* **crash storm**: every 10th call ends its own process (``os._exit``); every
  other call must complete and every crashed one settle as ``WorkerCrashed``.
* **map** (when decorated functions have ``map``): 100,000 trivial calls,
  process lane vs ``ProcessPoolExecutor.map`` at its best chunk size (target
  ≥ 0.8×), thread lane vs ``run_in_executor`` fanned out (target ≥ 10×).
  Without ``map`` both rows say "not measured" (verdict n/a).
* **where a call's CPU goes**: one extra fan-out of each process contender
  with the CPU time of every parent thread (loop thread, lane worker threads,
  the rest) and of the worker processes read before and after (psutil), per
  call. Not timed against anything: it tells where to optimise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import re
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, Mapping, Sequence

import psutil

from tokengate import GuardedFunction, OperationsCoordinator
from tokengate.errors import WorkerCrashed

from . import _lane_functions as lfn
from ._common import (BenchOptions, Target, finish, interleave, median, new_result, paired, paired_note, percentile,
                      ratio, settle)
from ._common import write_result
from ._report import TableData, fmt, new_figure, progress, render, save_figure, targets_table

__all__ = ["run", "map_available"]

NAME = "lanes"
_perf = time.perf_counter
RTT_BLOCK = 100
CRASH_EVERY = 10
READY_TIMEOUT_S = 120.0
MAP_CHUNKSIZES = (100, 1000, 5000, 20_000)
# Thread names of the process lane's workers: "<coordinator>-core<d>-p<i>" (see tokengate/lanes/process_worker.py).
_LANE_THREAD = re.compile(r"-core\d+-p\d+$")


def map_available() -> bool:
    """True when decorated functions have ``map`` (issue 13's batching): decided at run time, never assumed."""
    return callable(getattr(GuardedFunction, "map", None))


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -- pools and their warm-up ---------------------------------------------------------------


def _forkserver_pool(workers: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))


async def _wait_ready(coordinator: OperationsCoordinator) -> None:
    deadline = _perf() + READY_TIMEOUT_S
    while not coordinator.ready:
        if _perf() > deadline:
            raise RuntimeError(f"process lane not ready within {READY_TIMEOUT_S} s")
        await asyncio.sleep(0.002)


def _lane_workers(coordinator: OperationsCoordinator) -> list[dict[str, Any]]:
    lane = coordinator.stats()["lanes"].get("process")
    if lane is None:
        return []
    return [w for core in lane["cores"] for w in core["workers"]]


def _lane_pids(coordinator: OperationsCoordinator) -> list[int]:
    return [w["process"]["pid"] for w in _lane_workers(coordinator) if w.get("process") and w["process"]["pid"]]


def _executed(coordinator: OperationsCoordinator) -> dict[str, int]:
    """Calls (map: chunks) each process-lane worker has run so far, by worker id."""
    return {w["worker_id"]: int(w["executed"]) for w in _lane_workers(coordinator)}


def _spread_since(coordinator: OperationsCoordinator, before: dict[str, int]) -> dict[str, int]:
    return {wid: n - before.get(wid, 0) for wid, n in _executed(coordinator).items()}


def _lane_counter(coordinator: OperationsCoordinator, key: str) -> int:
    return sum(int(w["process"][key]) for w in _lane_workers(coordinator) if w.get("process"))


def _ppe_pids(pool: cf.ProcessPoolExecutor) -> list[int]:
    procs = getattr(pool, "_processes", None) or {}
    return [int(p) for p in procs]


async def _startups(repeats: int, workers: int, advance: Callable[[int], None]) -> dict[str, Any]:
    """Fresh coordinators: seconds from start to ``ready``; and each process's own start-up seconds."""
    to_ready: list[float] = []
    per_process: list[float] = []
    for _ in range(repeats):
        await settle()
        t0 = _perf()
        async with OperationsCoordinator(process_workers=workers, warm_processes=True, policies=[],
                                         name="lanes-startup") as coordinator:
            await _wait_ready(coordinator)
            to_ready.append(_perf() - t0)
            per_process += [w["process"]["startup_seconds"] for w in _lane_workers(coordinator)
                            if w.get("process") and w["process"]["startup_seconds"] is not None]
        advance(1)
    ppe_first: list[float] = []
    for _ in range(max(1, repeats)):
        t0 = _perf()
        pool = _forkserver_pool(workers)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*[loop.run_in_executor(pool, lfn.inc, i) for i in range(workers * 4)])
            ppe_first.append(_perf() - t0)
        finally:
            pool.shutdown(wait=True)
    return {
        "coordinator_to_ready_s": {"median": median(to_ready), "min": min(to_ready), "max": max(to_ready),
                                   "runs": to_ready},
        "process_startup_s": {"median": median(per_process), "min": min(per_process, default=None),
                              "max": max(per_process, default=None), "n": len(per_process)},
        "ppe_first_calls_s": {"median": median(ppe_first), "runs": ppe_first,
                              "note": f"ProcessPoolExecutor({workers}, forkserver) created + {workers * 4} "
                                      "trivial calls gathered (its processes start on demand)"},
    }


# -- CPU-bound ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _without_pull() -> Iterator[None]:
    """The process lane as it was before the pull: each call runs on the process it was routed to when submitted.

    No pull across domains, and a slow call is sent ahead behind a running one even when it is the last waiting.
    """
    from tokengate.lanes.process_worker import ProcessWorker

    pull, last = ProcessWorker._steal_across, ProcessWorker._last_waiting
    ProcessWorker._steal_across = ProcessWorker._last_waiting = lambda self: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        ProcessWorker._steal_across, ProcessWorker._last_waiting = pull, last  # type: ignore[method-assign]


def _calibrate(fn: Callable[[int], Any], guess: int, target_ms: float) -> tuple[int, float]:
    """An argument for which one inline call of *fn* uses about *target_ms* of CPU (best of 3), and that time.

    CPU time of this thread, not wall time: on a busy host a preempted wall-clock
    measurement looks longer than the work, and would size every call too small.
    """
    arg = max(1, guess)

    def timed(a: int) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.thread_time()
            fn(a)
            best = min(best, time.thread_time() - t0)
        return best * 1e3

    for _ in range(3):  # the work grows about linearly with the argument; refine twice
        ms = timed(arg)
        if 0.85 * target_ms <= ms <= 1.15 * target_ms:
            break
        arg = max(1, int(arg * target_ms / max(ms, 1e-3)))
    return arg, timed(arg)


async def _cpu(options: BenchOptions, coordinator: OperationsCoordinator, pool: cf.ProcessPoolExecutor,
               calls: int, target_ms: float, repeats: int, workloads: Sequence[str],
               advance: Callable[[int], None]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {}
    for wl in workloads:
        plain, plain_measured, on_process, on_thread, guess = lfn.CPU_WORKLOADS[wl]
        arg, inline_ms = _calibrate(plain, guess, target_ms)
        expected = plain(arg)

        def make(name: str) -> Callable[[int], Awaitable[list[tuple[Any, float]]]]:
            if name == "process_lane":
                return lambda k: asyncio.gather(*[on_process(arg) for _ in range(k)])
            if name == "process_lane_no_pull":
                async def no_pull(k: int) -> list[tuple[Any, float]]:
                    with _without_pull():
                        return list(await asyncio.gather(*[on_process(arg) for _ in range(k)]))
                return no_pull
            if name == "thread_lane":
                return lambda k: asyncio.gather(*[on_thread(arg) for _ in range(k)])
            return lambda k: asyncio.gather(*[loop.run_in_executor(pool, plain_measured, arg) for _ in range(k)])

        names = ["process_lane", "thread_lane", "ppe_run_in_executor", "process_lane_no_pull"]
        trials = {n: make(n) for n in names}
        for n in names:  # warm: every worker process has imported and run this function
            await trials[n](8)
        wall: dict[str, list[float]] = {n: [] for n in names}
        cpu_par: dict[str, list[float]] = {n: [] for n in names}
        wrong = 0
        spread: dict[str, dict[str, int]] = {n: {} for n in names if n.startswith("process_lane")}
        for _r, n in interleave(repeats, names):
            await settle()
            executed_before = _executed(coordinator)
            t0 = _perf()
            results = await trials[n](calls)
            elapsed = _perf() - t0
            if n in spread:  # how the lane spread the calls over its worker processes (all trials)
                for wid, count in _spread_since(coordinator, executed_before).items():
                    spread[n][wid] = spread[n].get(wid, 0) + count
            wall[n].append(elapsed)
            # Σ CPU the calls used on their own threads ÷ wall: the cores this contender really used.
            cpu_par[n].append(sum(cpu for _v, cpu in results) / elapsed)
            wrong += sum(1 for v, _cpu in results if v != expected)
            advance(1)
        med = {n: median(v) for n, v in wall.items()}
        serial = calls * inline_ms / 1e3
        out[wl] = {
            "arg": arg, "inline_ms": inline_ms, "calls": calls, "wrong_results": wrong,
            "process_calls_per_worker": spread["process_lane"],
            "no_pull_calls_per_worker": spread["process_lane_no_pull"],
            "wall_s": {n: {"median": med[n], "runs": v} for n, v in wall.items()},
            # > 1 only with real parallelism: the serial time of the work over the wall time.
            "speedup_vs_serial": {n: ratio(serial, med[n]) for n in names},
            "cpu_parallelism": {n: median(v) for n, v in cpu_par.items()},
            "cpu_parallelism_runs": cpu_par,
            "process_vs_thread": ratio(med["thread_lane"], med["process_lane"]),
            "process_vs_ppe": ratio(med["ppe_run_in_executor"], med["process_lane"]),
            "process_vs_no_pull": ratio(med["process_lane_no_pull"], med["process_lane"]),
            "no_pull_vs_ppe": ratio(med["ppe_run_in_executor"], med["process_lane_no_pull"]),
            # timeit's rule (interference only slows a trial): the best trial of each, beside the median.
            "best_process_vs_thread": ratio(min(wall["thread_lane"]), min(wall["process_lane"])),
            "best_process_vs_ppe": ratio(min(wall["ppe_run_in_executor"]), min(wall["process_lane"])),
            # Round by round (the contenders of a round ran seconds apart): drift over the run cancels here.
            "paired_process_vs_ppe": paired(wall["ppe_run_in_executor"], wall["process_lane"]),
            "paired_process_vs_thread": paired(wall["thread_lane"], wall["process_lane"]),
        }
    return out


def _pooled(rows: Mapping[str, Any]) -> dict[str, Any]:
    """Every workload's rounds together, pair by pair (each pair ran in one round of one workload).

    The per-workload rows have 7 pairs each; pooled, the comparison of lanes bound by
    the same cores gets 4x the pairs, and an interval narrow enough to say something.
    """
    def runs(name: str) -> list[float]:
        return [t for r in rows.values() for t in r["wall_s"][name]["runs"]]

    lane = runs("process_lane")
    return {"workloads": list(rows), "process_vs_ppe": paired(runs("ppe_run_in_executor"), lane),
            "process_vs_thread": paired(runs("thread_lane"), lane)}


# -- trivial calls ------------------------------------------------------------------------------


async def _timed_batches(trials: Mapping[str, Callable[[], Awaitable[Sequence[Any]]]], n: int, expected: int,
                         repeats: int, advance: Callable[[int], None]) -> tuple[dict[str, list[float]], int]:
    """Warm each trial once (a full batch: lazily grown structures reach their size), then time them
    interleaved: calls per second of each repeat by trial, and how many batches summed wrong."""
    for fn in trials.values():
        await fn()
    per_s: dict[str, list[float]] = {name: [] for name in trials}
    wrong = 0
    for _r, name in interleave(repeats, list(trials)):
        await settle()
        t0 = _perf()
        values = await trials[name]()
        per_s[name].append(n / (_perf() - t0))
        wrong += int(sum(values) != expected)
        advance(1)
    return per_s, wrong


async def _fan_out(options: BenchOptions, coordinator: OperationsCoordinator, pool: cf.ProcessPoolExecutor, n: int,
                   repeats: int, advance: Callable[[int], None]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    inc, inc_p, inc_t = lfn.inc, lfn.inc_p, lfn.inc_t
    trials: dict[str, Callable[[], Awaitable[list[Any]]]] = {
        "process_lane": lambda: asyncio.gather(*[inc_p(i) for i in range(n)]),
        "ppe_run_in_executor": lambda: asyncio.gather(*[loop.run_in_executor(pool, inc, i) for i in range(n)]),
        "thread_lane": lambda: asyncio.gather(*[inc_t(i) for i in range(n)]),
    }
    expected = n * (n + 1) // 2
    before = _executed(coordinator)
    per_s, wrong = await _timed_batches(trials, n, expected, repeats, advance)
    base = median(per_s["ppe_run_in_executor"])
    return {"calls": n, "wrong_batches": wrong, "process_calls_per_worker": _spread_since(coordinator, before),
            "per_contender": {name: {"median_per_s": median(v), "runs_per_s": v, "best_per_s": max(v),
                                     "ratio_vs_ppe": ratio(median(v), base),
                                     "ratio_best_vs_ppe": ratio(max(v), max(per_s["ppe_run_in_executor"]))}
                              for name, v in per_s.items()}}


async def _round_trip(options: BenchOptions, pool: cf.ProcessPoolExecutor, calls: int, repeats: int,
                      advance: Callable[[int], None]) -> dict[str, Any]:
    import anyio.to_process

    loop = asyncio.get_running_loop()
    inc, inc_p = lfn.inc, lfn.inc_p
    run_sync = anyio.to_process.run_sync
    one: dict[str, Callable[[int], Awaitable[Any]]] = {
        "process_lane": lambda i: inc_p(i),
        "anyio_to_process": lambda i: run_sync(inc, i),
        "ppe_run_in_executor": lambda i: loop.run_in_executor(pool, inc, i),
    }
    for call in one.values():  # warm: anyio starts its worker processes on demand
        await asyncio.gather(*[call(i) for i in range(8)])
        for i in range(50):
            await call(i)
    runs: dict[str, list[list[float]]] = {name: [] for name in one}
    block = max(1, min(RTT_BLOCK, calls // 10))
    for _r in range(repeats):
        await settle()
        samples: dict[str, list[float]] = {name: [] for name in one}
        done = 0
        while done < calls:  # small interleaved blocks: the machine's state changes over a run
            k = min(block, calls - done)
            for name, call in one.items():
                sink = samples[name]
                for i in range(k):
                    t0 = _perf()
                    await call(i)
                    sink.append(_perf() - t0)
            done += k
        for name in one:
            runs[name].append(samples[name])
        advance(len(one))
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        out[name] = {"p50_us": median(percentile(r, 50) * 1e6 for r in rs),
                     "best_p50_us": min(percentile(r, 50) * 1e6 for r in rs),
                     "p99_us": median(percentile(r, 99) * 1e6 for r in rs),
                     "runs_p50_us": [percentile(r, 50) * 1e6 for r in rs]}
    base = out["anyio_to_process"]["p50_us"]
    for entry in out.values():
        entry["ratio_p50_vs_anyio"] = ratio(entry["p50_us"], base)
    return {"calls": calls, "per_contender": out}


# -- crash storm ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_crash_warnings() -> Iterator[None]:
    """The lane logs a WARNING per dead process; the storm makes dozens on purpose (they are counted instead)."""
    lanes_logger = logging.getLogger("tokengate.lanes")
    level = lanes_logger.level
    lanes_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lanes_logger.setLevel(level)


async def _crash_storm(coordinator: OperationsCoordinator, n: int, repeats: int,
                       advance: Callable[[int], None]) -> dict[str, Any]:
    """*n* calls gathered, every 10th ends its process; the same *n* without crashes, for scale."""
    fn = lfn.crash_or_inc_p
    crash_at = [i % CRASH_EVERY == CRASH_EVERY - 1 for i in range(n)]
    storm_rates: list[float] = []
    clean_rates: list[float] = []
    counts = {"calls": 0, "crash_calls": 0, "completed": 0, "wrong_results": 0, "worker_crashed": 0,
              "crash_calls_completed": 0, "other_errors": 0}
    other: dict[str, int] = {}
    crashes_before = _lane_counter(coordinator, "crashes")
    restarts_before = _lane_counter(coordinator, "restarts")
    await asyncio.gather(*[fn(i, False) for i in range(20)])  # warm
    for _ in range(repeats):
        await settle()
        t0 = _perf()
        outcomes = await asyncio.gather(*[fn(i, c) for i, c in enumerate(crash_at)], return_exceptions=True)
        storm_rates.append(n / (_perf() - t0))
        for i, (c, o) in enumerate(zip(crash_at, outcomes)):
            counts["calls"] += 1
            counts["crash_calls"] += int(c)
            if isinstance(o, WorkerCrashed):
                counts["worker_crashed"] += 1
            elif isinstance(o, BaseException):
                counts["other_errors"] += 1
                other[type(o).__name__] = other.get(type(o).__name__, 0) + 1
            elif c:
                counts["crash_calls_completed"] += 1  # impossible unless os._exit did not end the process
            else:
                counts["completed"] += 1
                counts["wrong_results"] += int(o != i + 1)
        advance(1)
        await settle()
        t0 = _perf()
        await asyncio.gather(*[fn(i, False) for i in range(n)])
        clean_rates.append(n / (_perf() - t0))
        advance(1)
    crash_calls = counts["crash_calls"]
    good_calls = counts["calls"] - crash_calls
    return {
        **counts,
        "other_error_types": other,
        "lane_crashes_counted": _lane_counter(coordinator, "crashes") - crashes_before,
        "lane_restarts_counted": _lane_counter(coordinator, "restarts") - restarts_before,
        "storm_per_s": median(storm_rates), "storm_runs_per_s": storm_rates,
        "clean_per_s": median(clean_rates), "clean_runs_per_s": clean_rates,
        "completed_fraction": ratio(counts["completed"] - counts["wrong_results"], good_calls),
        "crashed_as_worker_crashed_fraction": ratio(counts["worker_crashed"], crash_calls),
    }


# -- map --------------------------------------------------------------------------------------------


async def _map(options: BenchOptions, coordinator: OperationsCoordinator | None, pool: cf.ProcessPoolExecutor,
               thread_pool: cf.ThreadPoolExecutor, n: int, repeats: int,
               advance: Callable[[int], None]) -> dict[str, Any]:
    if not map_available():
        return {"available": False, "reason": "not measured: map not available (GuardedFunction has no map)"}
    assert coordinator is not None
    loop = asyncio.get_running_loop()
    inc = lfn.inc
    xs = range(n)
    expected = n * (n + 1) // 2
    mapper_p: Any = getattr(lfn.inc_p, "map")
    mapper_t: Any = getattr(lfn.inc_t, "map")
    trials: dict[str, Callable[[], Awaitable[Sequence[int]]]] = {
        "process_lane_map": lambda: mapper_p(xs),
        "thread_lane_map": lambda: mapper_t(xs),
        "thread_run_in_executor_fan_out": lambda: asyncio.gather(
            *[loop.run_in_executor(thread_pool, inc, i) for i in xs]),
    }

    async def ppe_map(chunksize: int) -> Sequence[int]:
        # Called on the loop thread and blocking it: the anchor's best case (no event-loop hop at all).
        return list(pool.map(inc, xs, chunksize=chunksize))

    for c in MAP_CHUNKSIZES:
        trials[f"ppe_map_chunksize_{c}"] = lambda c=c: ppe_map(c)  # type: ignore[misc]
    before = _executed(coordinator)
    per_s, wrong = await _timed_batches(trials, n, expected, repeats, advance)
    med = {name: median(v) for name, v in per_s.items()}
    best_ppe = max((k for k in med if k.startswith("ppe_map")), key=lambda k: med[k])
    return {
        "available": True, "calls": n, "wrong_batches": wrong,
        # chunks each worker process ran (the map's chunks are calls of "<operation>[map]")
        "process_chunks_per_worker": _spread_since(coordinator, before),
        "per_contender": {name: {"median_per_s": med[name], "runs_per_s": v, "best_per_s": max(v)}
                          for name, v in per_s.items()},
        "best_ppe_map": best_ppe,
        "process_map_vs_best_ppe_map": ratio(med["process_lane_map"], med[best_ppe]),
        "thread_map_vs_run_in_executor": ratio(med["thread_lane_map"], med["thread_run_in_executor_fan_out"]),
        "best_trials_process_map_vs_best_ppe_map": ratio(
            max(per_s["process_lane_map"]), max(max(v) for k, v in per_s.items() if k.startswith("ppe_map"))),
    }


# -- where the CPU goes -----------------------------------------------------------------------------


def _thread_cpu() -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def _procs_cpu(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


async def _breakdown(coordinator: OperationsCoordinator, pool: cf.ProcessPoolExecutor, n: int) -> dict[str, Any]:
    """Per call: CPU µs of the loop thread, the lane's worker threads, other parent threads, the children."""
    loop = asyncio.get_running_loop()
    loop_tid = threading.get_native_id()
    inc, inc_p = lfn.inc, lfn.inc_p
    runs: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], list[int]]]] = {
        "process_lane": (lambda: asyncio.gather(*[inc_p(i) for i in range(n)]), lambda: _lane_pids(coordinator)),
        "ppe_run_in_executor": (lambda: asyncio.gather(*[loop.run_in_executor(pool, inc, i) for i in range(n)]),
                                lambda: _ppe_pids(pool)),
    }
    out: dict[str, Any] = {}
    for name, (trial, pids_of) in runs.items():
        await settle()
        lane_tids = {t.native_id for t in threading.enumerate() if _LANE_THREAD.search(t.name)}
        pids = pids_of()
        before, child_before, t0 = _thread_cpu(), _procs_cpu(pids), _perf()
        await trial()
        wall = _perf() - t0
        after, child_after = _thread_cpu(), _procs_cpu(pids)
        delta = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
        loop_cpu = delta.get(loop_tid, 0.0)
        lane_cpu = sum(v for tid, v in delta.items() if tid in lane_tids)
        other_cpu = sum(delta.values()) - loop_cpu - lane_cpu
        out[name] = {
            "calls": n,
            "wall_us_per_call": wall / n * 1e6,
            "loop_thread_cpu_us_per_call": loop_cpu / n * 1e6,
            "lane_worker_threads_cpu_us_per_call": lane_cpu / n * 1e6,
            "other_parent_threads_cpu_us_per_call": other_cpu / n * 1e6,
            "children_cpu_us_per_call": (child_after - child_before) / n * 1e6,
            "children": len(pids),
        }
    return out


# -- the run ----------------------------------------------------------------------------------------


async def _measure(options: BenchOptions, cfg: dict[str, Any], result: dict[str, Any]) -> None:
    workers = cfg["process_workers"]
    repeats = cfg["repeats"]
    workloads = cfg["cpu_workloads"]
    steps = (cfg["startup_repeats"] + len(workloads) * 4 * cfg["cpu_repeats"] + 3 * repeats + 3 * repeats
             + 2 * repeats + (3 + len(MAP_CHUNKSIZES)) * repeats)
    res = result["results"]
    with progress(options.progress, steps, "lanes") as advance:
        res["startup"] = await _startups(cfg["startup_repeats"], workers, advance)
        pool = _forkserver_pool(workers)
        thread_pool: cf.ThreadPoolExecutor | None = None
        try:
            t0 = _perf()
            async with OperationsCoordinator(process_workers=workers, warm_processes=True,
                                             max_pending=cfg["max_pending"], name="lanes") as coordinator:
                await _wait_ready(coordinator)
                res["startup"]["benchmark_coordinator_to_ready_s"] = _perf() - t0
                threads = coordinator.num_cores * coordinator.workers_per_core
                thread_pool = cf.ThreadPoolExecutor(threads, thread_name_prefix="bench-lanes-rie")
                loop = asyncio.get_running_loop()
                # Start the anchors' processes and threads outside every timing.
                await asyncio.gather(*[loop.run_in_executor(pool, lfn.inc, i) for i in range(workers * 8)])
                await asyncio.gather(*[loop.run_in_executor(thread_pool, lfn.inc, i) for i in range(threads * 8)])
                result["contenders"] = {
                    "process_lane": {"processes": len(_lane_workers(coordinator)),
                                     "coordinator": {"process_workers": workers, "warm_processes": True,
                                                     "num_cores": coordinator.num_cores,
                                                     "policies": [p.name for p in coordinator.policies]}},
                    "thread_lane": {"threads": threads},
                    "ppe_run_in_executor": {"processes": workers, "start_method": "forkserver",
                                            "note": "loop.run_in_executor(ProcessPoolExecutor(P, forkserver), f, x)"},
                    "anyio_to_process": {"processes": "anyio's default limiter (CPU count)",
                                         "note": "anyio.to_process.run_sync(f, x)"},
                    "thread_run_in_executor": {"threads": threads,
                                               "note": "loop.run_in_executor(ThreadPoolExecutor(T), f, x)"},
                }
                res["cpu"] = await _cpu(options, coordinator, pool, cfg["cpu_calls"], cfg["cpu_ms"], cfg["cpu_repeats"],
                                        workloads, advance)
                res["cpu_pooled"] = _pooled(res["cpu"])
                res["fan_out"] = await _fan_out(options, coordinator, pool, cfg["fan_out"], repeats, advance)
                res["round_trip"] = await _round_trip(options, pool, cfg["round_trip_calls"], repeats, advance)
                with _quiet_crash_warnings():
                    res["crash_storm"] = await _crash_storm(coordinator, cfg["crash_calls"], repeats, advance)
                res["map"] = await _map(options, coordinator, pool, thread_pool, cfg["map_calls"], repeats, advance)
                res["breakdown"] = await _breakdown(coordinator, pool, cfg["fan_out"])
                res["lane_after"] = {"processes": len(_lane_workers(coordinator)),
                                     "crashes": _lane_counter(coordinator, "crashes"),
                                     "restarts": _lane_counter(coordinator, "restarts")}
        finally:
            pool.shutdown(wait=True)
            if thread_pool is not None:
                thread_pool.shutdown(wait=True)


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the lanes benchmark; print its tables, write JSON, Markdown and PNG; return the result."""
    usable = _usable_cpus()
    cfg: dict[str, Any] = {
        "process_workers": int(options.size("process_workers", usable, usable)),
        "cpu_calls": int(options.size("cpu_calls", 64, 16)),
        "cpu_ms": float(options.size("cpu_ms", 20.0, 10.0)),
        "cpu_workloads": list(options.size("cpu_workloads", list(lfn.CPU_WORKLOADS), list(lfn.CPU_WORKLOADS))),
        "fan_out": int(options.size("fan_out", 20_000, 1_000)),
        "round_trip_calls": int(options.size("round_trip_calls", 2_000, 200)),
        "crash_calls": int(options.size("crash_calls", 100, 50)),
        "map_calls": int(options.size("map_calls", 100_000, 5_000)),
        "startup_repeats": int(options.size("startup_repeats", 3, 1)),
        "repeats": options.reps(3, 1),
        # The CPU-bound rows compare contenders bound by the same cores: their differences are a few per
        # cent, so they get more rounds (and a paired statistic beside the ratio of medians).
        "cpu_repeats": options.reps(7, 1),
    }
    for key in ("process_workers", "cpu_calls", "fan_out", "round_trip_calls", "crash_calls", "map_calls",
                "startup_repeats"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]!r}")
    if not cfg["cpu_ms"] > 0:
        raise ValueError(f"cpu_ms must be > 0, got {cfg['cpu_ms']!r}")
    unknown = [w for w in cfg["cpu_workloads"] if w not in lfn.CPU_WORKLOADS]
    if unknown:
        raise ValueError(f"unknown CPU workloads {unknown!r}; choose from {', '.join(lfn.CPU_WORKLOADS)}")
    cfg["max_pending"] = max(65_536, cfg["fan_out"], cfg["crash_calls"])
    cfg["map_available"] = map_available()
    result = new_result(NAME, options, cfg)
    asyncio.run(_measure(options, cfg, result))
    result["notes"] += [
        f"one coordinator, OperationsCoordinator(process_workers={cfg['process_workers']}, warm_processes=True), "
        "default policies; every anchor pool has the same number of processes",
        "start-up of every pool (the lane's and the anchors') is measured apart and excluded from throughput: "
        "all are started and warmed before any timed trial",
        "trivial calls (x + 1) are inferred 'light': on 2 domains they run on domain 2's process workers only; "
        "the CPU workloads are tagged 'heavy' on both lanes (heavy may spill onto every domain)",
        "CPU workloads are sized at run time to about cpu_ms of one core (best of 3 inline calls); CPU par. = the "
        "calls' own CPU time (time.thread_time inside each call) summed / wall time (2.0 is the limit on 2 CPUs)",
        "ProcessPoolExecutor.map runs blocking on the loop thread (its best case); map contenders need "
        "GuardedFunction.map, decided at run time",
    ]
    final = finish(result, _targets(result))
    write_result(final, options.out)
    _report(final, options)
    return final


def _targets(result: dict[str, Any]) -> list[Target]:
    res = result["results"]
    targets: list[Target] = []
    for wl, r in res["cpu"].items():
        targets.append(Target(f"CPU {wl} ({r['calls']} x {r['inline_ms']:.0f} ms): process lane vs thread lane",
                              r["process_vs_thread"], 1.8, ">=", note="2.0x is the limit on 2 CPUs"))
    for wl, r in res["cpu"].items():
        targets.append(Target(f"CPU {wl}: process lane vs ProcessPoolExecutor (run_in_executor)",
                              r["process_vs_ppe"], 1.0, ">=", note=paired_note(r["paired_process_vs_ppe"])))
    if res["cpu"]:
        pooled = res["cpu_pooled"]["process_vs_ppe"]
        targets.append(Target(f"CPU, the {len(res['cpu'])} workloads pooled round by round ({pooled['rounds']} pairs): "
                              "process lane vs ProcessPoolExecutor (median of the pairs)", pooled["median"], 1.0,
                              ">=", note=paired_note(pooled)))
    fo = res["fan_out"]
    targets.append(Target(f"trivial fan-out of {fo['calls']:,}: process lane vs ProcessPoolExecutor "
                          "(run_in_executor)", fo["per_contender"]["process_lane"]["ratio_vs_ppe"], 5.0, ">="))
    targets.append(Target("sequential round trip median: process lane vs anyio.to_process (lower is better)",
                          res["round_trip"]["per_contender"]["process_lane"]["ratio_p50_vs_anyio"], 1.0, "<="))
    cs = res["crash_storm"]
    targets.append(Target(f"crash storm ({cs['calls']:,} calls, 1 in {CRASH_EVERY} crashes): other calls completed "
                          "with the right result", cs["completed_fraction"], 1.0, ">=", unit=""))
    targets.append(Target("crash storm: crashed calls settled as WorkerCrashed", cs["crashed_as_worker_crashed_fraction"],
                          1.0, ">=", unit=""))
    mp = res["map"]
    if mp["available"]:
        targets.append(Target(f"map of {mp['calls']:,} trivial calls: process lane vs ProcessPoolExecutor.map "
                              f"(best chunksize: {mp['best_ppe_map'].rsplit('_', 1)[-1]})",
                              mp["process_map_vs_best_ppe_map"], 0.8, ">="))
        targets.append(Target(f"map of {mp['calls']:,} trivial calls: thread lane vs run_in_executor fanned out",
                              mp["thread_map_vs_run_in_executor"], 10.0, ">="))
    else:
        targets.append(Target("map, process lane vs ProcessPoolExecutor.map: " + mp["reason"], None, 0.8, ">="))
        targets.append(Target("map, thread lane vs run_in_executor fanned out: " + mp["reason"], None, 10.0, ">="))
    return targets


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    res = result["results"]
    cfg = result["config"]
    tables: list[TableData] = []

    st = res["startup"]
    t = TableData(f"lanes: warm start-up ({cfg['process_workers']} worker processes)", ["what", "median s", "min s",
                                                                                         "max s", "runs"])
    c2r = st["coordinator_to_ready_s"]
    t.add("coordinator start → ready (all processes up)", c2r["median"], c2r["min"], c2r["max"], len(c2r["runs"]))
    ps = st["process_startup_s"]
    t.add("one worker process (its own start-up)", ps["median"], ps["min"], ps["max"], ps["n"])
    t.add("ProcessPoolExecutor: create + first calls", st["ppe_first_calls_s"]["median"],
          min(st["ppe_first_calls_s"]["runs"]), max(st["ppe_first_calls_s"]["runs"]),
          len(st["ppe_first_calls_s"]["runs"]))
    t.caption = "start-up is excluded from every throughput below (all pools are warmed first)"
    tables.append(t)

    t = TableData(f"lanes: CPU-bound, {cfg['cpu_calls']} calls gathered (wall s, median)",
                  ["workload", "arg", "inline ms", "process lane", "thread lane", "PPE", "× thread lane", "× PPE",
                   "best: × thread", "best: × PPE", "CPU par.: process / thread / PPE", "calls per process",
                   "no pull: wall", "no pull: × PPE", "× no pull", "no pull: calls per process", "wrong"])
    for wl, r in res["cpu"].items():
        w = r["wall_s"]
        t.add(wl, r["arg"], r["inline_ms"], w["process_lane"]["median"], w["thread_lane"]["median"],
              w["ppe_run_in_executor"]["median"], r["process_vs_thread"], r["process_vs_ppe"],
              r["best_process_vs_thread"], r["best_process_vs_ppe"],
              " / ".join(fmt(r["cpu_parallelism"][n]) for n in ("process_lane", "thread_lane", "ppe_run_in_executor")),
              " / ".join(str(v) for v in r["process_calls_per_worker"].values()),
              w["process_lane_no_pull"]["median"], r["no_pull_vs_ppe"], r["process_vs_no_pull"],
              " / ".join(str(v) for v in r["no_pull_calls_per_worker"].values()), r["wrong_results"])
    t.caption = ("× = the other's wall time ÷ the process lane's (median; 'best' = best trial of each); PPE = "
                 "run_in_executor on ProcessPoolExecutor(forkserver); CPU par. = Σ CPU time of the calls (each on its own "
                 "thread, time.thread_time) ÷ wall: the cores each contender really used (≤ 2.0 on 2 CPUs; PPE's shows "
                 "what the machine gave this run); no pull = the same lane with the pull across domains switched off "
                 "(each call runs on the process it was routed to when submitted: the lane before the pull), "
                 "interleaved with the others")
    tables.append(t)

    fo = res["fan_out"]
    t = TableData(f"lanes: {fo['calls']:,} trivial calls gathered (calls/s, median)",
                  ["contender", "calls/s", "× PPE", "best trial calls/s", "best × PPE's best"])
    for name, r in fo["per_contender"].items():
        t.add(name, r["median_per_s"], r["ratio_vs_ppe"], r["best_per_s"], r["ratio_best_vs_ppe"])
    t.caption = ("process-lane calls per worker process: "
                 + " / ".join(str(v) for v in fo["process_calls_per_worker"].values())
                 + " (light calls run on the light domain's processes only)")
    tables.append(t)

    rt = res["round_trip"]
    t = TableData(f"lanes: sequential round trip ({rt['calls']:,} calls)", ["contender", "p50 µs", "p99 µs",
                                                                            "p50 × anyio", "best repeat's p50 µs"])
    for name, r in rt["per_contender"].items():
        t.add(name, r["p50_us"], r["p99_us"], r["ratio_p50_vs_anyio"], r["best_p50_us"])
    tables.append(t)

    cs = res["crash_storm"]
    t = TableData(f"lanes: crash storm (1 call in {CRASH_EVERY} ends its process; {cs['calls']:,} calls in all)",
                  ["calls", "crashing", "WorkerCrashed", "completed", "wrong", "other errors",
                   "storm calls/s", "same calls, no crash, calls/s", "lane crashes counted", "restarts counted"])
    t.add(cs["calls"], cs["crash_calls"], cs["worker_crashed"], cs["completed"], cs["wrong_results"],
          cs["other_errors"], cs["storm_per_s"], cs["clean_per_s"], cs["lane_crashes_counted"],
          cs["lane_restarts_counted"])
    if cs["other_error_types"]:
        t.caption = "other errors: " + ", ".join(f"{k}={v}" for k, v in cs["other_error_types"].items())
    tables.append(t)

    mp = res["map"]
    if mp["available"]:
        t = TableData(f"lanes: map of {mp['calls']:,} trivial calls (calls/s)", ["contender", "median", "best trial"])
        for name, r in mp["per_contender"].items():
            t.add(name, r["median_per_s"], r["best_per_s"])
        t.caption = (f"process map ÷ best PPE.map ({mp['best_ppe_map']}) = {fmt(mp['process_map_vs_best_ppe_map'])} "
                     f"(best trials: {fmt(mp['best_trials_process_map_vs_best_ppe_map'])}); "
                     f"thread map ÷ run_in_executor fanned out = {fmt(mp['thread_map_vs_run_in_executor'])}; "
                     "process-lane chunks per worker process: "
                     + " / ".join(str(v) for v in mp["process_chunks_per_worker"].values()))
    else:
        t = TableData("lanes: map", ["status"])
        t.add(mp["reason"])
    tables.append(t)

    bd = res["breakdown"]
    t = TableData("lanes: where one trivial call's time goes (µs per call, one fan-out each)",
                  ["contender", "wall", "loop thread CPU", "lane worker threads CPU", "other parent threads CPU",
                   "worker processes CPU"])
    for name, r in bd.items():
        t.add(name, r["wall_us_per_call"], r["loop_thread_cpu_us_per_call"],
              r["lane_worker_threads_cpu_us_per_call"], r["other_parent_threads_cpu_us_per_call"],
              r["children_cpu_us_per_call"])
    t.caption = ("CPU time of each parent thread (psutil) and of the pool's processes, before/after one gather; "
                 "PPE's call-queue and result threads count as 'other parent threads'")
    tables.append(t)
    tables.append(targets_table("lanes targets", result["targets"]))
    render(tables, options.out, NAME, result["machine"], console=options.console)

    fig, (ax1, ax2) = new_figure(2, "lanes: process lane vs thread lane and process pools", result["machine"])
    names = ["process_lane", "thread_lane", "ppe_run_in_executor"]
    wls = list(res["cpu"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(wls))]
        ax1.bar(xs, [res["cpu"][wl]["wall_s"][name]["median"] or 0 for wl in wls], width, label=name)
    ax1.set_xticks([j + width for j in range(len(wls))], wls, fontsize=8)
    ax1.set_ylabel(f"wall s for {cfg['cpu_calls']} calls (median)")
    ax1.legend(fontsize=8)
    labels = list(fo["per_contender"])
    ax2.bar(range(len(labels)), [fo["per_contender"][n]["median_per_s"] or 0 for n in labels])
    ax2.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax2.set_ylabel(f"trivial calls/s, {fo['calls']:,} gathered")
    save_figure(fig, options.out, NAME)
