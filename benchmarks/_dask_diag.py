"""Diagnose the Dask lane's CPU-bound gap: per contender, wall, CPU of this process and the workers,
messages in and out of the (in-process) scheduler per call, and idle gaps between tasks on each worker.

python -m benchmarks._dask_diag [rounds] [calls] [ms] [contenders,comma,separated] [profile]

A diagnostic, not a benchmark with targets (like ``_http_diag``): the evidence
behind the Dask lane's CPU-bound section of the README.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import os
import statistics
import sys
import time
from typing import Any

import psutil

from ._lane_functions import spin
from .bench_dask import _calibrate

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
CALLS = int(sys.argv[2]) if len(sys.argv) > 2 else 64
MS = float(sys.argv[3]) if len(sys.argv) > 3 else 50.0
ONLY = sys.argv[4].split(",") if len(sys.argv) > 4 else None
PROFILE = len(sys.argv) > 5
profs: dict[str, list[Any]] = {}

counts: collections.Counter[str] = collections.Counter()


def patch_batched() -> None:
    from distributed import batched
    orig_send = batched.BatchedSend.send

    def send(self: Any, *msgs: Any) -> None:
        for m in msgs:
            counts[f"out:{m.get('op') if isinstance(m, dict) else m[0]}"] += 1
        return orig_send(self, *msgs)
    batched.BatchedSend.send = send  # type: ignore[method-assign]
    orig_bg = batched.BatchedSend._background_send

    async def bg(self: Any) -> None:
        # count batches written: wrap comm.write once per stream
        comm = self.comm
        if comm is not None and not getattr(comm, "_counted", False):
            w = comm.write

            async def write(msg: Any, *a: Any, **k: Any) -> Any:
                counts["batches_out"] += 1
                return await w(msg, *a, **k)
            comm.write = write
            comm._counted = True
        return await orig_bg(self)
    batched.BatchedSend._background_send = bg  # type: ignore[method-assign]


def patch_scheduler(s: Any) -> None:
    for name, fn in list(s.stream_handlers.items()):
        def wrap(fn: Any = fn, name: str = name) -> Any:
            if asyncio.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def h(*a: Any, **k: Any) -> Any:
                    counts[f"in:{name}"] += 1
                    return await fn(*a, **k)
                return h

            @functools.wraps(fn)
            def h2(*a: Any, **k: Any) -> Any:
                counts[f"in:{name}"] += 1
                return fn(*a, **k)
            return h2
        s.stream_handlers[name] = wrap()
    for name, fn in list(s.handlers.items()):
        def wrap2(fn: Any = fn, name: str = name) -> Any:
            if asyncio.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def h(*a: Any, **k: Any) -> Any:
                    counts[f"rpc:{name}"] += 1
                    return await fn(*a, **k)
            else:
                @functools.wraps(fn)
                def h(*a: Any, **k: Any) -> Any:  # type: ignore[misc]
                    counts[f"rpc:{name}"] += 1
                    return fn(*a, **k)
            return h
        s.handlers[name] = wrap2()


async def main() -> None:
    from distributed import Client, LocalCluster
    from distributed.diagnostics.task_stream import TaskStreamPlugin

    from tokengate import OperationsCoordinator, task_token_guard
    patch_batched()
    # DASK_DIAG_LOOP fixes spin's loop count (runs on a loaded host then compare: calibration drifts).
    cpu_n = int(os.environ.get("DASK_DIAG_LOOP") or 0) or _calibrate(MS)
    lane_spin = task_token_guard(operation_type="bench.dask.spin", tags={"lane": "dask", "weight": "heavy"})(spin)
    cluster = await LocalCluster(n_workers=2, threads_per_worker=1, processes=True, asynchronous=True,
                                 host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                 resources={"heavy": 1, "medium": 1, "light": 1})
    s = cluster.scheduler
    patch_scheduler(s)
    plugin = TaskStreamPlugin(s)
    s.add_plugin(plugin)
    client = await Client(cluster, asynchronous=True)
    coordinator = OperationsCoordinator(num_cores=2, policies=[], dask_address=cluster.scheduler_address,
                                        warm_dask=True)
    await coordinator.astart()
    me = psutil.Process()
    kids = [p for p in me.children(recursive=True)]
    await client.gather(client.map(spin, [1000] * 4, pure=False))
    await asyncio.gather(*[lane_spin(1000) for _ in range(4)])

    async def raw_map() -> None:
        await client.gather(client.map(spin, [cpu_n] * CALLS, pure=False))

    async def raw_map_res() -> None:
        await client.gather(client.map(spin, [cpu_n] * CALLS, pure=False, resources={"heavy": 1}))

    async def raw_invoke() -> None:
        from tokengate.lanes import _dask_task
        payloads = [_dask_task.Payload(spin, (cpu_n,), None) for _ in range(CALLS)]
        await client.gather(client.map(_dask_task.invoke, payloads, pure=False, resources={"heavy": 1}))

    async def raw_res_each() -> None:
        from distributed import as_completed
        futures = client.map(spin, [cpu_n] * CALLS, pure=False, resources={"heavy": 1})
        async for f in as_completed(futures):
            await f

    async def raw_each() -> None:
        await asyncio.gather(*[client.submit(spin, cpu_n, pure=False) for _ in range(CALLS)])

    async def raw_each_res() -> None:
        await asyncio.gather(*[client.submit(spin, cpu_n, pure=False, resources={"heavy": 1})
                               for _ in range(CALLS)])

    async def lane() -> None:
        await asyncio.gather(*[lane_spin(cpu_n) for _ in range(CALLS)])

    from tokengate.lanes import dask_calls as dc
    from tokengate.lanes import dask_results as dr

    def variant(rel: float, win: float, rounds: int = 64, share: float = 0.1) -> Any:
        async def run() -> None:
            saved = (dr._GATHER_SHARE, dc._RELEASE_BUSY_DELAY, dr._GATHER_WINDOW, dr._GATHER_BATCH)
            dr._GATHER_SHARE = share
            dc._RELEASE_BUSY_DELAY = rel
            dr._GATHER_WINDOW = win
            dr._GATHER_BATCH = rounds
            try:
                await lane()
            finally:  # back to the lane's own settings
                dr._GATHER_SHARE, dc._RELEASE_BUSY_DELAY, dr._GATHER_WINDOW, dr._GATHER_BATCH = saved
        return run

    async def lane_nopush() -> None:
        # No topic in the payloads: no result is pushed, every one is fetched with a gather (as before 998f5a3).
        lane_ = coordinator._dask
        assert lane_ is not None
        saved = lane_.topic
        lane_.topic = None
        try:
            await lane()
        finally:
            lane_.topic = saved

    contenders = {"lane_nopush": lane_nopush, "lane_before": variant(0.005, 0.0), "lane_old": variant(0.005, 0.0), "lane_rel": variant(0.1, 0.0), "lane_w50": variant(0.1, 0.05), "lane_nogather": variant(10.0, 10.0, 1000, 100.0),
                  "lane_norel": variant(10.0, 0.02), "lane_rel1s": variant(1.0, 0.02), "lane_gatherend": variant(0.5, 10.0, 1000, 100.0), "lane_relend": variant(10.0, 0.1), "lane_w0": variant(0.1, 0.0), "lane_rel05": variant(0.5, 0.1),
                  "lane_share25": variant(0.1, 0.25, 64, 0.25), "lane_now": variant(0.1, 0.1),
                  "raw_res_each": raw_res_each, "raw_invoke": raw_invoke,
                  "raw_map": raw_map, "raw_map_res": raw_map_res, "raw_each": raw_each,
                  "raw_each_res": raw_each_res, "lane": lane}
    if ONLY:
        contenders = {k: v for k, v in contenders.items() if k in ONLY}
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in contenders}
    msgs: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in contenders}
    for r in range(ROUNDS):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            await asyncio.sleep(0.3)
            counts.clear()
            idx = plugin.index
            kc0 = sum(sum(p.cpu_times()[:2]) for p in kids)
            c0 = time.process_time()
            t0w = time.time()
            t0 = time.perf_counter()
            if PROFILE:
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            await contenders[name]()
            if PROFILE:
                prof.disable()
                profs.setdefault(name, []).append(prof)
            wall = time.perf_counter() - t0
            t1w = time.time()
            c1 = time.process_time()
            kc1 = sum(sum(p.cpu_times()[:2]) for p in kids)
            await asyncio.sleep(0.05)
            msgs[name].update(counts)
            recs = [rec for rec in plugin.collect(start_index=idx) if rec["key"] and ("spin" in str(rec["key"]) or "invoke" in str(rec["key"]))]
            per_worker: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
            for rec in recs:
                for ss in rec["startstops"]:
                    if ss["action"] == "compute":
                        per_worker[rec["worker"]].append((ss["start"], ss["stop"]))
            gaps = []
            head = []
            for w, iv in per_worker.items():
                iv.sort()
                head.append(iv[0][0] - t0w)
                gaps += [b[0] - a[1] for a, b in zip(iv, iv[1:])]
            busy = sum(b - a for iv in per_worker.values() for a, b in iv)
            rows[name].append({"wall": wall, "calls/s": CALLS / wall, "main_cpu_ms/call": 1000 * (c1 - c0) / CALLS,
                               "worker_cpu/wall": (kc1 - kc0) / wall, "par": (kc1 - kc0 + c1 - c0) / wall,
                               "busy/wall": busy / wall / 2,
                               "gap_ms_mean": 1000 * statistics.mean(gaps) if gaps else 0,
                               "gap_ms_max": 1000 * max(gaps) if gaps else 0,
                               "idle_gaps_ms_sum": 1000 * sum(gaps),
                               "head_ms": 1000 * statistics.mean(head) if head else 0,
                               "tail_ms": 1000 * (t1w - max(b for iv in per_worker.values() for _, b in iv)),
                               "tasks_w": float(min(len(v) for v in per_worker.values())),
                               })
    for name, rs in rows.items():
        print(f"== {name}: calls/s " + " ".join(f"{r['calls/s']:.1f}" for r in rs))
        for k in rs[0]:
            print(f"   {k:18s} " + " ".join(f"{r[k]:8.2f}" for r in rs))
        c = msgs[name]
        print("   msgs/call: " + ", ".join(f"{k}={v / CALLS / ROUNDS:.2f}" for k, v in sorted(c.items())
                                           if v / CALLS / ROUNDS >= 0.05))
    if PROFILE:
        import pstats
        for name, ps in profs.items():
            st = pstats.Stats(ps[0])
            for p in ps[1:]:
                st.add(p)
            if os.environ.get("DASK_DIAG_PROF_DIR"):  # for pstats / snakeviz later
                st.dump_stats(os.path.join(os.environ["DASK_DIAG_PROF_DIR"], f"{name}.prof"))
            print("######", name)
            st.sort_stats("tottime").print_stats(25)
            st.sort_stats("cumtime").print_stats(40)
        # Python calls per Dask call, by function, first contender against the others: unlike wall
        # time on a shared host, call counts barely move from run to run.
        tables = {}
        for name, ps in profs.items():
            st = pstats.Stats(ps[0])
            for p in ps[1:]:
                st.add(p)
            tables[name] = {f"{fn[0].split('site-packages/')[-1]}:{fn[2]}": (v[1], v[2])
                            for fn, v in st.stats.items()}  # type: ignore[attr-defined]
        names = list(tables)
        per = CALLS * ROUNDS
        for other in names[1:]:
            a, b = tables[names[0]], tables[other]
            print(f"###### calls per Dask call: {names[0]} {sum(v[0] for v in a.values()) / per:.0f}, "
                  f"{other} {sum(v[0] for v in b.values()) / per:.0f}; largest differences:")
            diff = sorted(set(a) | set(b), key=lambda k: -abs(a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0]))
            for k in diff[:60]:
                print(f"   {a.get(k, (0, 0))[0] / per:8.2f} {b.get(k, (0, 0))[0] / per:8.2f}  "
                      f"{1e3 * a.get(k, (0, 0))[1] / per:7.3f} {1e3 * b.get(k, (0, 0))[1] / per:7.3f} ms  {k}")
    await coordinator.aclose()
    await client.close()
    await cluster.close()


if __name__ == "__main__":
    asyncio.run(main())
