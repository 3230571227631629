"""Smoke tests for the benchmark suite: each benchmark runs in-process with tiny sizes so it cannot rot.

These check the *shape* of each result (keys, files, sane values such as
positive throughput and zero failures), never a timing target: the machines
are noisy and the targets are reported by the benchmarks, not asserted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks.__main__ import BENCHMARKS, STANDARD, build_parser, options_from
from benchmarks._common import BenchOptions, Target, interleave, percentile
from benchmarks._contenders import ALL_CONTENDERS, parse_contenders

MACHINE_KEYS = {"cpu_count", "usable_cpus", "python_version", "python_implementation", "platform", "gil",
                "tokengate_version", "date"}


def _options(tmp_path: Path, **sizes: Any) -> BenchOptions:
    return BenchOptions(out=tmp_path, quick=True, repeats=1, progress=False, console=False, sizes=sizes)


def _check_common(result: dict[str, Any], name: str, out: Path) -> None:
    assert result["benchmark"] == name
    assert MACHINE_KEYS <= set(result["machine"])
    assert result["machine"]["usable_cpus"] >= 1
    assert result["duration_s"] > 0
    for target in result["targets"]:
        assert {"name", "measured", "threshold", "op", "pass", "verdict"} <= set(target)
        assert target["verdict"] in ("PASS", "FAIL", "n/a")
    for suffix in ("json", "md", "png"):
        assert (out / f"{name}.{suffix}").stat().st_size > 0
    on_disk = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    assert on_disk["benchmark"] == name
    assert on_disk["targets"] == result["targets"]


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x) and x > 0


def test_dispatch_smoke(tmp_path: Path) -> None:
    # Given every contender and two tiny fan-out sizes
    from benchmarks import bench_dispatch

    # When the dispatch benchmark runs
    result = bench_dispatch.run(_options(tmp_path, batches=[50, 200], calls=40))

    # Then each contender has a positive throughput per size and a round trip, and both targets are reported
    _check_common(result, "dispatch", tmp_path)
    assert set(result["contenders"]) == set(ALL_CONTENDERS)
    for size in ("50", "200"):
        for name in ALL_CONTENDERS:
            assert _positive(result["results"]["throughput"][size][name]["median_per_s"])
    for name in ALL_CONTENDERS:
        rt = result["results"]["round_trip"][name]
        assert _positive(rt["p50_us"]) and rt["p99_us"] >= rt["p50_us"]
    assert result["results"]["throughput"]["200"]["run_in_executor"]["ratio_vs_run_in_executor"] == 1.0
    assert len(result["targets"]) == 3
    for name in ALL_CONTENDERS:
        entry = result["results"]["throughput"]["200"][name]
        assert entry["best_per_s"] == max(entry["runs_per_s"]) >= entry["median_per_s"]
    assert result["results"]["throughput"]["200"]["run_in_executor"]["ratio_best_vs_run_in_executor"] == 1.0
    assert result["contenders"]["run_in_executor"]["threads"] == result["contenders"]["tokengate"]["threads"]


def test_waves_smoke(tmp_path: Path) -> None:
    # Given the seeds' workload cut to waves of 4..32 tokens
    from benchmarks import bench_waves

    # When the waves benchmark runs against tokengate and run_in_executor
    result = bench_waves.run(_options(tmp_path, max_wave=32, min_tokens_per_point=8,
                                      contenders="tokengate,run_in_executor"))

    # Then every wave of every contender settled without failures and the metrics are sane
    _check_common(result, "waves", tmp_path)
    waves = result["results"]["waves"]
    assert set(waves) == {"tokengate", "run_in_executor"}
    for rows in waves.values():
        assert [r["tokens"] for r in rows] == [4, 8, 16, 32]
        for r in rows:
            assert r["failures"] == 0
            assert _positive(r["tokens_per_s"])
            assert _positive(r["parallelism"]) and _positive(r["overlap_seeds"])
            assert r["latency_p99_ms"] >= r["latency_p50_ms"] >= 0
            assert r["queue_wait_p50_ms"] >= 0
    assert result["results"]["summary"]["tokengate"]["failures"] == 0
    for rows in waves.values():
        for r in rows:
            assert r["best_tokens_per_s"] == max(r["runs_tokens_per_s"]) >= r["tokens_per_s"]
    summary = result["results"]["summary"]["tokengate"]
    # waves 4..32 end before wave 6, so neither flatness figure exists (reported as n/a, never invented)
    assert summary["flatness_from_wave_6"] is None and summary["flatness_best_trials_from_wave_6"] is None
    assert [t["name"] for t in result["targets"]][-1].endswith("best trial per wave (noise-robust view)")


def test_waves_pass_schedule_spreads_trials_over_passes() -> None:
    # Given the default sizes, 3 passes, ~2,048 tokens per small point, and waves above 8,192 run once
    from benchmarks.bench_waves import MAX_SMALL_REPEATS, pass_schedule

    sizes = [4, 128, 1024, 2048, 8192, 65536]

    # When the trial plan is built
    plan = pass_schedule(sizes, 3, 8192, 2048)

    # Then each pass runs every wave at most once in ascending order (the large one in pass 1 only),
    # and each wave gets its total trial count spread as evenly as possible
    assert len(plan) == 3
    assert [n for n, _ in plan[0]] == sizes
    assert [n for n, _ in plan[1]] == [n for n, _ in plan[2]] == sizes[:-1]
    totals = {n: sum(k for p in plan for m, k in p if m == n) for n in sizes}
    assert totals == {4: MAX_SMALL_REPEATS, 128: 16, 1024: 3, 2048: 3, 8192: 3, 65536: 1}
    for n in sizes[:-1]:
        per_pass = [k for p in plan for m, k in p if m == n]
        assert max(per_pass) - min(per_pass) <= 1 and min(per_pass) >= 1
    with pytest.raises(ValueError, match="passes must be >= 1"):
        pass_schedule(sizes, 0, 8192, 2048)


def test_memory_smoke(tmp_path: Path) -> None:
    # Given a few thousand trivial calls in batches
    from benchmarks import bench_memory

    # When the memory benchmark runs
    result = bench_memory.run(_options(tmp_path, tokens=3000, batch_size=500))

    # Then no token outlives its settlement and RSS figures are present
    _check_common(result, "memory", tmp_path)
    tg = result["results"]["per_contender"]["tokengate"]
    assert tg["tokens"] == 3000
    assert tg["alive_after_settle"] == 0
    assert tg["alive_after_stop"] == 0
    assert tg["inflight_after_settle"] == 0
    # And the RSS baseline was taken with the warm-up's last batch (500 calls) freed, like the end
    # reading (see settle). TaskTokens are TokenGate's alone, so none may be left; the anchor counts
    # every asyncio.Future in the process, and the loop's own can be alive (seen: 2), never a batch.
    assert tg["alive_at_baseline"] == 0
    for name, per in result["results"]["per_contender"].items():
        assert per["alive_at_baseline"] < 50, name
    assert _positive(tg["rss_after_warmup_mb"]) and isinstance(tg["rss_growth_mb"], float)
    assert "run_in_executor" in result["results"]["per_contender"]


def test_features_smoke(tmp_path: Path) -> None:
    # Given tiny trials of the default policy set against none
    from benchmarks import bench_features

    # When the features benchmark runs
    result = bench_features.run(_options(tmp_path, features_n=300, calls=30))

    # Then both variants have a throughput and the locality part either ran or says why it was skipped
    _check_common(result, "features", tmp_path)
    pol = result["results"]["policies"]
    assert _positive(pol["no_policies"]["tokens_per_s"]) and _positive(pol["default_policies"]["tokens_per_s"])
    assert _positive(pol["throughput_ratio_default_vs_none"])
    assert pol["no_policies"]["policies"] == []
    locality = result["results"]["locality"]
    assert locality["skipped"] or locality["result"]


@pytest.mark.slow
def test_http_smoke(tmp_path: Path) -> None:
    # Given both apps served by real uvicorn subprocesses, with a short, small flood
    from benchmarks import bench_http

    # When the http benchmark runs (wrk floods when installed, else the httpx flood process)
    result = bench_http.run(_options(tmp_path, clients=16, heavy_ms=50, flood_seconds=1.0, max_flood_seconds=2.0,
                                     idle_seconds=0.5, probes=10, e2e_requests=100, e2e_seconds=1.0))

    # Then all three apps served every request, probes alternated light and ping, and every ratio is reported
    _check_common(result, "http", tmp_path)
    assert set(result["results"]["isolation"]) == {"tokengate", "plain", "plain_same"}
    for kind in ("tokengate", "plain", "plain_same"):
        iso = result["results"]["isolation"][kind]
        assert iso["probe_errors"] == 0 and iso["heavy_errors"] == 0
        assert iso["idle"]["n"] > 0 and iso["flood"]["n"] > 0
        assert iso["flood_ping"]["n"] == iso["flood"]["n"]  # one /ping per /light: alternating rounds
        assert len(iso["runs_flood_p99_ms"]) == 1
        assert _positive(iso["heavy_per_s"])
        assert _positive(result["results"]["e2e"][kind]["rps"])
        assert all(run["errors"] == 0 for run in result["results"]["e2e"][kind]["runs"])
    contenders = result["contenders"]
    assert contenders["plain"]["limiter_total_tokens"] == 40  # anyio's default, left untouched
    assert contenders["plain_same"]["limiter_total_tokens"] == contenders["tokengate"]["threads"]
    assert len(result["targets"]) == 6
    assert result["config"]["flood_generator"] in ("wrk", "httpx")
    # And the servers' logs were written (the processes ran and were stopped)
    assert (tmp_path / "http-server-tokengate.log").exists()


def test_lanes_smoke(tmp_path: Path) -> None:
    # Given the lanes benchmark cut to tiny sizes: 2 worker processes, 4 calls of ~2 ms per CPU workload,
    # 100 trivial calls fanned out, 20 round trips, a 20-call crash storm (calls 9 and 19 crash), 500 mapped
    from benchmarks import bench_lanes

    # When it runs
    result = bench_lanes.run(_options(tmp_path, process_workers=2, cpu_calls=4, cpu_ms=2.0,
                                      cpu_workloads=["spin", "hash_chain"], fan_out=100, round_trip_calls=20,
                                      crash_calls=20, map_calls=500, startup_repeats=1))

    # Then every section has sane figures and every call returned the right value
    _check_common(result, "lanes", tmp_path)
    res = result["results"]
    assert _positive(res["startup"]["coordinator_to_ready_s"]["median"])
    assert res["startup"]["process_startup_s"]["n"] == 2
    assert set(res["cpu"]) == {"spin", "hash_chain"}
    for r in res["cpu"].values():
        assert r["wrong_results"] == 0 and r["arg"] >= 1
        assert all(_positive(r["wall_s"][n]["median"]) for n in ("process_lane", "thread_lane", "ppe_run_in_executor"))
        assert _positive(r["process_vs_thread"]) and _positive(r["process_vs_ppe"])
        # the lane with its pull across domains switched off ran the same calls, on the lane's processes
        assert _positive(r["process_vs_no_pull"]) and sum(r["no_pull_calls_per_worker"].values()) == 4
        assert sum(r["process_calls_per_worker"].values()) == 4
        # the calls report their own CPU time: a contender cannot use more than the usable CPUs
        assert all(0 < r["cpu_parallelism"][n] <= result["machine"]["usable_cpus"] * 1.05 for n in r["wall_s"])
    assert res["fan_out"]["wrong_batches"] == 0
    assert sum(res["fan_out"]["process_calls_per_worker"].values()) >= 100  # 1 repeat + the warm-up batch
    assert res["fan_out"]["per_contender"]["ppe_run_in_executor"]["ratio_vs_ppe"] == 1.0
    assert all(_positive(r["median_per_s"]) for r in res["fan_out"]["per_contender"].values())
    rt = res["round_trip"]["per_contender"]
    assert rt["anyio_to_process"]["ratio_p50_vs_anyio"] == 1.0
    assert all(_positive(r["p50_us"]) and r["p99_us"] >= r["p50_us"] for r in rt.values())
    # And the crash storm: exactly the crashing calls settled as WorkerCrashed, every other one completed
    storm = res["crash_storm"]
    assert storm["calls"] == 20 and storm["crash_calls"] == 2
    assert storm["worker_crashed"] == 2 and storm["completed"] == 18
    assert storm["wrong_results"] == storm["other_errors"] == storm["crash_calls_completed"] == 0
    assert storm["lane_crashes_counted"] == 2
    assert storm["completed_fraction"] == storm["crashed_as_worker_crashed_fraction"] == 1.0
    # And map is measured exactly when decorated functions have it
    assert res["map"]["available"] is bench_lanes.map_available()
    if res["map"]["available"]:
        assert res["map"]["wrong_batches"] == 0
        assert all(_positive(r["median_per_s"]) for r in res["map"]["per_contender"].values())
    for r in res["breakdown"].values():
        assert _positive(r["wall_us_per_call"]) and r["children"] >= 1
    # the pooled CPU comparison holds every workload's pairs, each a round of one workload
    pooled = res["cpu_pooled"]["process_vs_ppe"]
    assert pooled["rounds"] == sum(len(r["wall_s"]["process_lane"]["runs"]) for r in res["cpu"].values()) == 2
    assert _positive(pooled["median"]) and pooled["ci95"][0] <= pooled["median"] <= pooled["ci95"][1]
    # 2 CPU workloads x 2 targets, the pooled CPU target, fan-out, round trip, 2 crash storm, 2 map
    assert len(result["targets"]) == 11
    by_name = {t["name"]: t for t in result["targets"]}
    assert all(t["verdict"] == "PASS" for name, t in by_name.items() if name.startswith("crash storm"))


def test_lanes_map_rows_say_not_measured_without_map(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given decorated functions without map (before issue 13's batching lands, or if it goes away)
    import asyncio

    from benchmarks import bench_lanes
    from tokengate import GuardedFunction

    if hasattr(GuardedFunction, "map"):
        monkeypatch.delattr(GuardedFunction, "map")
    assert not bench_lanes.map_available()

    # When the map section runs and the targets are computed
    section = asyncio.run(bench_lanes._map(_options(Path(".")), None, None, None, 10, 1, lambda n: None))  # type: ignore[arg-type]
    result = {"results": {"cpu": {}, "map": section,
                          "fan_out": {"calls": 1, "per_contender": {"process_lane": {"ratio_vs_ppe": 1.0}}},
                          "round_trip": {"per_contender": {"process_lane": {"ratio_p50_vs_anyio": 1.0}}},
                          "crash_storm": {"calls": 1, "completed_fraction": 1.0,
                                          "crashed_as_worker_crashed_fraction": 1.0}}}
    targets = [t.to_dict() for t in bench_lanes._targets(result)]

    # Then both map rows are reported, unmeasured (n/a) and saying why, never invented
    rows = [t for t in targets if t["name"].startswith("map")]
    assert len(rows) == 2
    assert all(t["measured"] is None and t["verdict"] == "n/a" and "map not available" in t["name"] for t in rows)


def test_cli_parses_sizes_into_options(tmp_path: Path) -> None:
    # Given a command line with per-benchmark sizes
    ns = build_parser().parse_args(["dispatch", "--quick", "--out", str(tmp_path), "--batches", "10,20_000",
                                    "--repeats", "2", "--no-progress", "--contenders", "anyio"])

    # When it becomes options
    options = options_from(ns)

    # Then the sizes are typed and the flags carried over
    assert options.sizes["batches"] == [10, 20000]
    assert options.repeats == 2 and options.quick and not options.progress
    assert options.size("batches", [1], [2]) == [10, 20000]
    assert options.size("calls", 5000, 300) == 300
    # Every benchmark is in the standard set but dask, which starts a cluster and runs on its own.
    assert set(BENCHMARKS) - set(STANDARD) == {"dask"} and set(STANDARD) < set(BENCHMARKS)


def test_parse_contenders_keeps_the_baselines_and_refuses_unknown_names() -> None:
    assert parse_contenders("anyio") == ("tokengate", "run_in_executor", "anyio")
    assert parse_contenders(None) == ALL_CONTENDERS
    with pytest.raises(ValueError, match="unknown contenders"):
        parse_contenders("celery")


def test_helpers_percentile_interleave_and_target_verdicts() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert math.isnan(percentile([], 99))
    # each round starts one contender later: none always runs first, or always after the same one
    assert list(interleave(3, ["a", "b", "c"])) == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"),
                                                   (2, "c"), (2, "a"), (2, "b")]
    assert Target("t", 5.1, 5.0, ">=").verdict == "PASS"
    assert Target("t", 1.2, 1.0, "<=").verdict == "FAIL"
    assert Target("t", None, 1.0, "<=").verdict == "n/a"


def test_paired_compares_round_by_round_and_bounds_its_median() -> None:
    from benchmarks._common import paired

    # The host slows down over the run (every trial of round 3 takes 3x as long): the contender is
    # 10 % faster in every round, which the round-by-round ratio shows exactly.
    anchor = [1.0, 2.0, 3.0, 1.5, 1.1]
    contender = [a / 1.1 for a in anchor]
    p = paired(anchor, contender)
    assert p["median"] == pytest.approx(1.1) and p["won"] == 1.0 and p["rounds"] == 5
    assert p["ci95"][0] == pytest.approx(1.1) and p["ci95"][1] == pytest.approx(1.1)
    # a tie in one round is not a win; the interval holds the median and comes from the ratios only
    mixed = paired([1.0, 1.0, 1.0, 1.0], [0.9, 1.0, 1.2, 0.8])
    assert mixed["won"] == 0.5
    assert min(mixed["ratios"]) <= mixed["ci95"][0] <= mixed["median"] <= mixed["ci95"][1] <= max(mixed["ratios"])
    assert paired([1.0, 2.0], [0.5, 4.0]) == paired([1.0, 2.0], [0.5, 4.0])  # a fixed seed: reproducible
    assert math.isnan(paired([], [])["median"])


_WRK_SUMMARY = """Running 14s test @ http://127.0.0.1:8000/heavy
  2 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   512.31ms   20.12ms   1.20s    90.00%
  Latency Distribution
     50%  510.00ms
     75%  520.50ms
     90%  900.00us
     99%    1.20s
  2713 requests in 14.02s, 400.00KB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:    193.51
"""


def test_parse_wrk_reads_requests_errors_and_the_latency_distribution_in_ms() -> None:
    from benchmarks._http_wrk import parse_wrk

    out = parse_wrk(_WRK_SUMMARY)

    assert out["requests"] == 2713 and out["errors"] == 4 + 1 + 2
    assert out["elapsed_s"] == pytest.approx(14.02)
    assert out["p50_ms"] == 510.0 and out["p75_ms"] == 520.5
    assert out["p90_ms"] == pytest.approx(0.9) and out["p99_ms"] == 1200.0  # us and s converted
    # A killed wrk prints nothing: zeros, not an exception
    assert parse_wrk("") == {"requests": 0, "errors": 0, "elapsed_s": 0.0}


def test_wrk_flood_refuses_fewer_connections_than_threads() -> None:
    from benchmarks._http_wrk import WrkFlood

    with pytest.raises(ValueError, match="connections >= threads"):
        WrkFlood("wrk", "http://127.0.0.1:9/heavy", connections=1, threads=2, max_seconds=1)


def test_schedstat_delta_splits_the_loop_thread_from_the_others() -> None:
    from benchmarks._http_proc import read_schedstat, schedstat_delta

    # Given the loop thread (tid == pid) and two workers, one of which appeared during the interval
    before = {100: (1_000_000, 500_000, 10), 101: (0, 0, 0)}
    after = {100: (3_000_000, 1_500_000, 14), 101: (400_000, 800_000, 6), 102: (200_000, 0, 2)}

    out = schedstat_delta(100, before, after, requests=4)

    # Then the loop's CPU, run-queue wait and slices are its own, per answered request too
    assert out["loop_thread"]["threads"] == 1 and out["other_threads"]["threads"] == 2
    assert out["loop_thread"]["cpu_ms"] == 2.0 and out["loop_thread"]["runqueue_wait_ms"] == 1.0
    assert out["loop_thread"]["cpu_us_per_request"] == 500.0 and out["loop_thread"]["slices_per_request"] == 1.0
    assert out["other_threads"]["cpu_ms"] == pytest.approx(0.6) and out["other_threads"]["slices"] == 8
    # And on Linux this process's own threads can be read (empty where /proc has no schedstat)
    import os

    mine = read_schedstat(os.getpid())
    assert not mine or os.getpid() in mine


def test_http_probes_alternate_light_and_ping_and_stop_at_their_bounds() -> None:
    # Given a server double: /light and /ping answer 200, except every third /light answers 500
    import asyncio

    import httpx

    from benchmarks import bench_http

    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/light" and calls.count("/light") % 3 == 0:
            return httpx.Response(500)
        return httpx.Response(200, json={"ok": True})

    async def run(**bounds: Any) -> tuple[list[float], list[float], int]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://127.0.0.1:9") as c:
            return await bench_http._probes(c, gap_s=0.0, **bounds)

    # When the probes need 4 light samples (no minimum time, generous time bound)
    light, ping, errors = asyncio.run(run(min_seconds=0.0, max_seconds=60.0, min_light=4, max_rounds=100))

    # Then rounds alternate /light and /ping, stop once 4 light answers succeeded, and count the errors
    assert calls[:4] == ["/light", "/ping", "/light", "/ping"]
    assert len(light) == 4 and len(ping) == 5 and errors == 1  # 5 rounds: the third /light failed
    # And the round bound holds even when the sample target is out of reach
    calls.clear()
    light, ping, errors = asyncio.run(run(min_seconds=0.0, max_seconds=60.0, min_light=1000, max_rounds=5))
    assert len(calls) == 10 and len(ping) == 5


def test_http_diag_bunching_tells_waves_from_an_even_spread() -> None:
    from benchmarks._http_diag import _bunching, _parse_variant

    even = [i * 0.005 for i in range(200)]  # one completion every 5 ms: 195/s spread evenly
    waves = [w * 0.2 + i * 0.0002 for w in range(10) for i in range(20)]  # 20 at once every 200 ms
    assert _bunching(even) <= 2
    assert _bunching(waves) >= 15
    assert _parse_variant("b:tokengate:core=/x,switch=0.001") == {"label": "b", "kind": "tokengate",
                                                                   "core": "/x", "switch": "0.001"}
    with pytest.raises(SystemExit):
        _parse_variant("b:flask")


_FAKE_WRK = '''#!{python}
import sys, time
t = time.process_time()
while time.process_time() - t < 0.3:  # the load generator's own CPU work
    pass
print("Running 2s test @ " + sys.argv[-1])
print("  4362 requests in 2.00s, 580.00KB read")
print("  Non-2xx or 3xx responses: 362")
print("Requests/sec:   2180.12")
'''


def test_http_wrk_client_cpu_share_is_the_load_generators(tmp_path: Path) -> None:
    # Given a stand-in for wrk that burns 0.3 s of its own CPU and prints wrk's summary lines, 362 of
    # its 4,362 responses errors
    import asyncio
    import sys

    from benchmarks import bench_http

    wrk = tmp_path / "wrk"
    wrk.write_text(_FAKE_WRK.format(python=sys.executable), encoding="utf-8")
    wrk.chmod(0o755)

    class _Server:
        url = "http://127.0.0.1:9"

        def cpu_seconds(self) -> float:
            return 0.0

    # When the wrk end-to-end phase runs against it
    server: Any = _Server()
    out = asyncio.run(bench_http._rps_wrk(server, {"concurrency": 32, "e2e_seconds": 2.0}, str(wrk)))

    # Then req/s counts successful responses only (as the httpx path does), and client_cpu_share is the
    # generator's CPU (a child process), not this one's
    assert out["load_generator"] == "wrk" and out["requests"] == 4000 and out["errors"] == 362
    assert out["rps"] == pytest.approx(2180.12 * 4000 / 4362)
    assert 0.1 < out["client_cpu_share"] <= 1.5
