"""features: what TokenGate's optional machinery costs, as ratios against plain tokens.

Two parts:

* **locality** (sticky, ordered and conducted routing): wraps
  ``benchmarks.bench_locality_core.run(n, repeats)`` (written with the
  locality issue) when that module exists; skipped with a clear message
  otherwise.
* **default safety policies**: trivial-token fan-out throughput and round trip
  with ``OperationsCoordinator(policies=[])`` against ``OperationsCoordinator()``
  (the default policy set), interleaved (none, default, none, default, ...),
  each trial on a freshly started coordinator (warmed up before timing).
"""

from __future__ import annotations

import asyncio
import importlib
import math
import time
from typing import Any, Iterator

from tokengate import OperationsCoordinator

from ._common import BenchOptions, Target, finish, interleave, median, new_result, percentile, ratio, settle_gc
from ._common import write_result
from ._report import TableData, fmt, new_figure, progress, render, save_figure, targets_table
from ._workloads import noop

__all__ = ["run"]

NAME = "features"
LOCALITY_MODULE = "benchmarks.bench_locality_core"
_perf = time.perf_counter
VARIANTS: dict[str, dict[str, Any]] = {"no_policies": {"policies": []}, "default_policies": {}}


async def _trial(kwargs: dict[str, Any], n: int, calls: int) -> dict[str, Any]:
    async with OperationsCoordinator(**kwargs) as c:
        await asyncio.gather(*[noop() for _ in range(min(n, 1000))])  # warm-up
        settle_gc()
        t0 = _perf()
        await asyncio.gather(*[noop() for _ in range(n)])
        fan_out = n / (_perf() - t0)
        rtt = []
        for _ in range(calls):
            t1 = _perf()
            await noop()
            rtt.append(_perf() - t1)
        return {"tokens_per_s": fan_out, "rtt_p50_us": percentile(rtt, 50) * 1e6,
                "policies": [p.name for p in c.policies]}


async def _policies(options: BenchOptions, n: int, calls: int, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with progress(options.progress, repeats * len(VARIANTS), "features: policies") as advance:
        for _r, variant in interleave(repeats, list(VARIANTS)):
            runs[variant].append(await _trial(VARIANTS[variant], n, calls))
            advance(1)
    out: dict[str, Any] = {}
    for variant, trials in runs.items():
        out[variant] = {
            "policies": trials[0]["policies"],
            "tokens_per_s": median(t["tokens_per_s"] for t in trials),
            "runs_tokens_per_s": [t["tokens_per_s"] for t in trials],
            "rtt_p50_us": median(t["rtt_p50_us"] for t in trials),
        }
    none, dflt = out["no_policies"], out["default_policies"]
    out["throughput_ratio_default_vs_none"] = ratio(dflt["tokens_per_s"], none["tokens_per_s"])
    out["rtt_ratio_default_vs_none"] = ratio(dflt["rtt_p50_us"], none["rtt_p50_us"])
    out["added_cost_us_per_call"] = (1e6 / dflt["tokens_per_s"] - 1e6 / none["tokens_per_s"])
    return out


def _locality(n: int, repeats: int) -> dict[str, Any]:
    try:
        module = importlib.import_module(LOCALITY_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != LOCALITY_MODULE:
            raise
        return {"skipped": f"{LOCALITY_MODULE} not found (written with the locality issue); locality part skipped"}
    fn = getattr(module, "run", None)
    if fn is None:
        return {"skipped": f"{LOCALITY_MODULE} has no run(n, repeats) function; locality part skipped"}
    data: dict[str, Any] = fn(n=n, repeats=repeats)
    return {"skipped": None, "n": n, "repeats": repeats, "result": data}


def _leaves(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(f"{prefix}.{k}" if prefix else str(k), v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield prefix, value


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the features benchmark; print its tables, write JSON, Markdown and PNG; return the result."""
    n = int(options.size("features_n", 20_000, 2000))
    calls = int(options.size("calls", 2000, 200))
    repeats = options.reps(3, 1)
    result = new_result(NAME, options, {"n": n, "round_trip_calls": calls, "repeats": repeats,
                                        "variants": VARIANTS})
    result["results"]["locality"] = _locality(n, repeats)
    result["results"]["policies"] = asyncio.run(_policies(options, n, calls, repeats))
    pol = result["results"]["policies"]
    result["contenders"] = {v: {"coordinator_kwargs": kw, "policies": pol[v]["policies"]}
                            for v, kw in VARIANTS.items()}
    if not pol["default_policies"]["policies"]:
        result["notes"].append("the default policy set is empty in this build: the policy ratio compares two "
                               "identical configurations (expect ~1.0)")
    targets: list[Target] = []  # reported as ratios; the issue sets no pass/fail bar for these
    final = finish(result, targets)
    write_result(final, options.out)
    _report(final, options)
    return final


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    pol = result["results"]["policies"]
    t = TableData(f"features: default safety policies vs none ({result['config']['n']:,}-call fan-out)",
                  ["variant", "policies", "calls/s", "round trip p50 µs"])
    for v in VARIANTS:
        t.add(v, ", ".join(pol[v]["policies"]) or "(none)", pol[v]["tokens_per_s"], pol[v]["rtt_p50_us"])
    t.caption = (f"throughput ratio default/none = {fmt(pol['throughput_ratio_default_vs_none'])}, "
                 f"round-trip ratio = {fmt(pol['rtt_ratio_default_vs_none'])}, "
                 f"added cost ≈ {fmt(pol['added_cost_us_per_call'])} µs per call")
    tables = [t]
    loc = result["results"]["locality"]
    lt = TableData("features: locality routing (bench_locality_core)", ["metric", "value"])
    if loc.get("skipped"):
        lt.add("skipped", loc["skipped"])
    else:
        for key, value in list(_leaves("", loc["result"]))[:40]:
            lt.add(key, value)
    tables.append(lt)
    if result["targets"]:
        tables.append(targets_table("features targets", result["targets"]))
    render(tables, options.out, NAME, result["machine"], console=options.console)
    fig, (ax,) = new_figure(1, "features: cost of the default policy set", result["machine"], width=7)
    heights = [float(pol[v]["tokens_per_s"] or 0) for v in VARIANTS]
    ax.bar(list(VARIANTS), heights)
    ax.set_ylabel("trivial calls / s (median)")
    for i, h in enumerate(heights):
        if not math.isnan(h):
            ax.text(i, h, fmt(h), ha="center", va="bottom", fontsize=8)
    save_figure(fig, options.out, NAME)
