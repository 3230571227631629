"""features: what TokenGate's optional machinery costs, as ratios against plain tokens.

Two parts:

* **locality** (sticky, ordered and conducted routing): wraps
  ``benchmarks.bench_locality_core.run(n, repeats)`` (written with the
  locality issue) when that module exists; skipped with a clear message
  otherwise.
* **default safety policies**: trivial-token fan-out throughput and round trip
  with ``OperationsCoordinator(policies=[])`` against ``OperationsCoordinator()``
  (the default policy set). Both coordinators run side by side on one loop
  and calls go through ``coordinator.submit`` (what the decorated function
  calls after finding the current coordinator), so the two configurations
  can be interleaved finely: fan-outs alternate, round trips alternate in
  blocks of 100 calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import time
from typing import Any, Iterator

from tokengate import OperationsCoordinator

from ._common import BenchOptions, Target, finish, interleave, median, new_result, percentile, ratio, settle
from ._common import write_result
from ._report import TableData, fmt, new_figure, progress, render, save_figure, targets_table
from ._workloads import noop

__all__ = ["run"]

NAME = "features"
LOCALITY_MODULE = "benchmarks.bench_locality_core"
_perf = time.perf_counter
VARIANTS: dict[str, dict[str, Any]] = {"no_policies": {"policies": []}, "default_policies": {}}


async def _fan_out(c: OperationsCoordinator, n: int) -> float:
    submit = c.submit
    t0 = _perf()
    await asyncio.gather(*[submit(noop, (), {}) for _ in range(n)])
    return n / (_perf() - t0)


async def _round_trips(c: OperationsCoordinator, k: int) -> list[float]:
    submit = c.submit
    out = []
    for _ in range(k):
        t0 = _perf()
        await submit(noop, (), {})
        out.append(_perf() - t0)
    return out


async def _policies(options: BenchOptions, n: int, calls: int, repeats: int) -> dict[str, Any]:
    """Both configurations run side by side on this loop; calls go through ``coordinator.submit``.

    ``submit`` is what a decorated function calls once it has looked up the
    current coordinator; calling it directly lets two coordinators serve the
    same loop, so the two can be interleaved finely (fan-outs alternate;
    round trips alternate in blocks of 100 calls).
    """
    fan: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rtt: dict[str, list[float]] = {v: [] for v in VARIANTS}
    async with contextlib.AsyncExitStack() as stack:
        coords = {v: await stack.enter_async_context(OperationsCoordinator(**kw)) for v, kw in VARIANTS.items()}
        for c in coords.values():  # warm-up: threads awake, plans cached
            await _fan_out(c, min(n, 1000))
            await _round_trips(c, 100)
        with progress(options.progress, repeats * len(VARIANTS), "features: policies") as advance:
            for _r, variant in interleave(repeats, list(VARIANTS)):
                await settle()
                fan[variant].append(await _fan_out(coords[variant], n))
                advance(1)
        for r in range(repeats):
            samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
            done = 0
            while done < calls:
                k = min(100, calls - done)
                for v, c in coords.items():
                    samples[v] += await _round_trips(c, k)
                done += k
            for v in VARIANTS:
                rtt[v].append(percentile(samples[v], 50) * 1e6)
        names = {v: [p.name for p in c.policies] for v, c in coords.items()}
    out: dict[str, Any] = {}
    for v in VARIANTS:
        out[v] = {"policies": names[v], "tokens_per_s": median(fan[v]), "runs_tokens_per_s": fan[v],
                  "rtt_p50_us": median(rtt[v]), "runs_rtt_p50_us": rtt[v]}
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
