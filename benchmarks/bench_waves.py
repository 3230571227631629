"""waves: the seeds' 15-wave "maximum concurrency" workload, measured honestly, against the anchors.

The workload is the seeds' (``_workloads.wave_job``): 15 doubling waves of
4 → 65,536 calls (131,068 in all), each wave submitted then gathered with
``return_exceptions=True``. Per wave and contender:

* ``tokens_per_s``: wave size ÷ (submit + gather) time;
* ``latency``: per call, creation → settle (tokens: ``token.created_at`` → a
  done-callback timestamp; anchors: just before submit → done callback);
* ``queue_wait``: creation → the function starting on its thread
  (``token.queue_wait``; anchors: a timestamp taken first thing on the thread);
* ``failures``: exceptions returned by the gather;
* ``parallelism``: Σ thread CPU time of the function bodies (``time.thread_time``
  around each body, summed over all threads) ÷ wave wall time. This is the
  real parallelism: under the GIL it cannot exceed ~1 for pure-Python work;
* ``process_cpu``: process CPU time (all threads incl. the event loop) ÷ wall;
* ``overlap_seeds``: the seeds' definition, Σ per-call wall run time ÷ wave
  time. It counts time a thread spends waiting for the GIL as work, so it
  grows with the thread count, not with useful parallelism.

Trials are arranged in *passes*: each pass runs every wave once, smallest
first, as the seeds did, and the run makes ``repeats`` passes (default 3).
Within a pass the contenders are interleaved per wave (A B C D, A B C D, ...),
and waves small enough to end in milliseconds repeat inside the pass until
about 2,048 tokens per contender (at most 25 times in all). Medians over every
trial are reported. The passes matter on a shared machine: a slow stretch of
the host lasts seconds to tens of seconds, and when all trials of one wave ran
back to back, one such stretch could slow every trial of that wave and become
the max/min figure; spread over passes, it lands on different waves each time
and the median leaves it out. ``trial_spread`` (max/min over a wave's trials)
shows how noisy each point was. Waves above ``large_wave`` tokens
(``--large-wave``; by default none) run in the first pass only, for a shorter
run.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Callable, Sequence

from ._common import (
    BenchOptions,
    Target,
    finish,
    median,
    new_result,
    percentile,
    ratio,
    settle,
    write_result,
)
from ._contenders import Contender, make_contenders, parse_contenders, started
from ._report import TableData, new_figure, progress, render, save_figure, targets_table
from ._workloads import meter_totals, wave_job, wave_sizes

__all__ = ["run"]

NAME = "waves"
_perf = time.perf_counter
FLAT_FROM_WAVE = 6  # the seeds' "sustained" region starts here (128 tokens)
MAX_SMALL_REPEATS = 25


def _mark(done_at: list[float], i: int, _fut: Any) -> None:
    done_at[i] = _perf()


def _stamped(starts: list[float], i: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    # Runs on the anchor's thread: the first thing it does is note the start.
    starts[i] = _perf()
    return fn(*args)


async def _wave(c: Contender, jobs: Sequence[tuple[Any, tuple[Any, ...]]]) -> dict[str, Any]:
    """Submit every job of one wave, gather, and measure."""
    n = len(jobs)
    done_at = [0.0] * n
    created = [0.0] * n
    starts = [0.0] * n
    futures: list[asyncio.Future[Any]] = []
    is_tg = c.name == "tokengate"
    await settle()
    cpu0, wall0, calls0 = meter_totals()
    pcpu0 = time.process_time()
    t0 = _perf()
    for i, (fn, args) in enumerate(jobs):
        if is_tg:
            fut: asyncio.Future[Any] = fn(*args)
        else:
            created[i] = _perf()
            fut = asyncio.ensure_future(c.submit(_stamped, starts, i, fn.func, args))
        fut.add_done_callback(functools.partial(_mark, done_at, i))
        futures.append(fut)
    results = await asyncio.gather(*futures, return_exceptions=True)
    elapsed = _perf() - t0
    pcpu = time.process_time() - pcpu0
    cpu1, wall1, calls1 = meter_totals()
    if is_tg:
        created = [f.created_at for f in futures]  # type: ignore[attr-defined]
        waits = [f.queue_wait for f in futures if f.queue_wait is not None]  # type: ignore[attr-defined]
    else:
        waits = [s - c0 for s, c0 in zip(starts, created) if s]
    latencies = [d - c0 for d, c0 in zip(done_at, created)]
    failures = sum(1 for r in results if isinstance(r, BaseException))
    del futures, results
    return {
        "tokens": n,
        "elapsed_s": elapsed,
        "tokens_per_s": n / elapsed,
        "latency_p50_ms": percentile(latencies, 50) * 1e3,
        "latency_p99_ms": percentile(latencies, 99) * 1e3,
        "queue_wait_p50_ms": percentile(waits, 50) * 1e3,
        "queue_wait_p99_ms": percentile(waits, 99) * 1e3,
        "failures": failures,
        "calls_metered": calls1 - calls0,
        "parallelism": (cpu1 - cpu0) / elapsed,
        "process_cpu": pcpu / elapsed,
        "overlap_seeds": (wall1 - wall0) / elapsed,
    }


def pass_schedule(sizes: Sequence[int], passes: int, large_wave: int,
                  min_tokens: int) -> list[list[tuple[int, int]]]:
    """The trial plan: *passes* lists of ``(wave size, trials in this pass)``, sizes ascending.

    Every wave gets at least one trial per pass; a wave of *n* tokens gets
    ``ceil(min_tokens / n)`` trials in all (at most ``MAX_SMALL_REPEATS``),
    spread as evenly as the passes allow. Waves above *large_wave* run in the
    first pass only.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes!r}")
    plan: list[list[tuple[int, int]]] = [[] for _ in range(passes)]
    for n in sizes:
        if n > large_wave:
            plan[0].append((n, 1))
            continue
        trials = max(passes, min(MAX_SMALL_REPEATS, -(-min_tokens // n)))
        base, extra = divmod(trials, passes)
        for p in range(passes):
            plan[p].append((n, base + (1 if p < extra else 0)))
    return plan


_METRICS = ("tokens_per_s", "latency_p50_ms", "latency_p99_ms", "queue_wait_p50_ms", "queue_wait_p99_ms",
            "parallelism", "process_cpu", "overlap_seeds")


async def _measure(options: BenchOptions, names: Sequence[str], sizes: Sequence[int], repeats: int,
                   large_wave: int, min_tokens: int, kwargs: dict[str, Any], result: dict[str, Any]) -> None:
    contenders = make_contenders(names, kwargs)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {c: {n: [] for n in sizes} for c in names}

    schedule = pass_schedule(sizes, repeats, large_wave, min_tokens)
    total = sum(n * k for plan in schedule for n, k in plan) * len(names)
    async with started(contenders):
        warm = [wave_job(i) for i in range(256)]  # the seeds' warm-up size; not recorded
        for c in contenders:
            await _wave(c, warm)
        with progress(options.progress, total, "waves (tokens)") as advance:
            for plan in schedule:
                for n, k in plan:
                    jobs = [wave_job(i) for i in range(n)]
                    for _r in range(k):
                        for c in contenders:
                            runs[c.name][n].append(await _wave(c, jobs))
                            advance(n)
                    del jobs
        result["contenders"] = {c.name: c.describe() for c in contenders}

    waves: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        rows = []
        for idx, n in enumerate(sizes, start=1):
            trials = runs[name][n]
            tps = [t["tokens_per_s"] for t in trials]
            row: dict[str, Any] = {"wave": idx, "tokens": n, "trials": len(trials),
                                   "failures": sum(t["failures"] for t in trials),
                                   "runs_tokens_per_s": tps,
                                   "best_tokens_per_s": max(tps),
                                   "trial_spread": max(tps) / min(tps)}
            row.update({m: median(t[m] for t in trials) for m in _METRICS})
            rows.append(row)
        waves[name] = rows
    base = waves["run_in_executor"]
    for name in names:
        for row, ref in zip(waves[name], base):
            row["ratio_vs_run_in_executor"] = ratio(row["tokens_per_s"], ref["tokens_per_s"])
    summary = {}
    for name in names:
        tput = [r["tokens_per_s"] for r in waves[name] if r["wave"] >= FLAT_FROM_WAVE]
        best = [r["best_tokens_per_s"] for r in waves[name] if r["wave"] >= FLAT_FROM_WAVE]
        total_tokens = sum(r["tokens"] for r in waves[name])
        summary[name] = {
            "total_tokens_per_wave_set": total_tokens,
            "failures": sum(r["failures"] for r in waves[name]),
            "flatness_from_wave_6": (max(tput) / min(tput)) if len(tput) >= 2 else None,
            # The same max/min over each wave's best trial: interference only ever slows a
            # trial (timeit's rule), so this view is robust to a noisy host.
            "flatness_best_trials_from_wave_6": (max(best) / min(best)) if len(best) >= 2 else None,
            "min_ratio_vs_run_in_executor": min(r["ratio_vs_run_in_executor"] for r in waves[name]),
            "peak_overlap_seeds": max(r["overlap_seeds"] for r in waves[name]),
            "peak_parallelism": max(r["parallelism"] for r in waves[name]),
        }
    result["results"].update(waves=waves, summary=summary)


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the waves benchmark; print its tables, write JSON, Markdown and PNG; return the result."""
    max_wave = int(options.size("max_wave", 65_536, 1024))
    sizes = wave_sizes(max_wave)
    if not sizes:
        raise ValueError(f"max_wave must be >= 4, got {max_wave!r}")
    repeats = options.reps(3, 1)
    # Every wave is repeated by default: a single trial of a large wave put one
    # noisy sample (±25 % on this kind of VM) straight into the max/min target.
    large_wave = int(options.size("large_wave", max_wave, 8192))
    min_tokens = int(options.size("min_tokens_per_point", 2048, 256))
    names = parse_contenders(options.sizes.get("contenders"))
    kwargs: dict[str, Any] = {}
    result = new_result(NAME, options, {"waves": sizes, "total_tokens": sum(sizes), "repeats": repeats,
                                        "large_wave": large_wave, "min_tokens_per_point": min_tokens,
                                        "contenders": list(names),
                                        "coordinator_kwargs": kwargs})
    asyncio.run(_measure(options, names, sizes, repeats, large_wave, min_tokens, kwargs, result))
    result["notes"] += [
        "workload: the seeds' four functions round-robin by i (cpu_crunch light, string_transform light, "
        "data_sort medium, hash_chain heavy); tokens/s timer covers submit + gather",
        "parallelism = Σ time.thread_time() inside the function bodies ÷ wave wall time (real CPU parallelism)",
        "process_cpu = time.process_time() delta (all threads, event loop included) ÷ wave wall time",
        "overlap_seeds = the seeds' definition: Σ per-call wall run time ÷ wave time; it counts waiting for the "
        "GIL as work, so it is NOT parallelism",
        f"{repeats} passes, each running every wave once, smallest first (contenders interleaved per wave); "
        f"small waves repeat until ~{min_tokens} tokens per contender (max {MAX_SMALL_REPEATS}x in all); waves "
        f"above {large_wave} tokens run in the first pass only; medians over all trials reported",
        "trial_spread = max/min tokens/s over one wave's trials: how noisy the machine was for that point",
    ]
    final = finish(result, _targets(result))
    write_result(final, options.out)
    _report(final, options)
    return final


def _targets(result: dict[str, Any]) -> list[Target]:
    s = result["results"]["summary"]["tokengate"]
    return [
        Target("tokengate failures (all waves)", float(s["failures"]), 0, "<=", unit=""),
        Target("worst wave tokens/s vs run_in_executor", s["min_ratio_vs_run_in_executor"], 0.8, ">="),
        Target(f"tokens/s max/min from wave {FLAT_FROM_WAVE} on", s["flatness_from_wave_6"], 1.5, "<="),
        Target(f"max/min from wave {FLAT_FROM_WAVE} on, best trial per wave (noise-robust view)",
               s["flatness_best_trials_from_wave_6"], 1.5, "<=",
               note="each wave's best trial; the median row above is the target"),
    ]


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    waves = result["results"]["waves"]
    names = list(waves)
    cols = ["wave", "tokens", "trials", "tok/s", "spread", "× rie", "lat p50 ms", "lat p99 ms", "wait p50 ms", "wait p99 ms",
            "fail", "CPU par.", "proc CPU", "overlap (seeds)"]
    tables = []
    for name in ("tokengate", "run_in_executor"):
        t = TableData(f"waves: {name} per wave", cols)
        for r in waves[name]:
            t.add(r["wave"], r["tokens"], r["trials"], r["tokens_per_s"], r["trial_spread"],
                  r["ratio_vs_run_in_executor"], r["latency_p50_ms"],
                  r["latency_p99_ms"], r["queue_wait_p50_ms"], r["queue_wait_p99_ms"], r["failures"],
                  r["parallelism"], r["process_cpu"], r["overlap_seeds"])
        t.caption = ("tok/s = median over the trials; spread = max/min tok/s over them (machine noise); "
                     "CPU par. = Σ thread CPU ÷ wall (real parallelism); overlap (seeds) = Σ per-call wall ÷ "
                     "wall, counts GIL waits as work")
        tables.append(t)
    comp = TableData("waves: tokens/s by contender (median)", ["wave", "tokens", *names])
    for i, row in enumerate(waves["tokengate"]):
        comp.add(row["wave"], row["tokens"], *[waves[n][i]["tokens_per_s"] for n in names])
    summ = TableData("waves: summary", ["contender", "failures", f"max/min tok/s (wave ≥ {FLAT_FROM_WAVE})",
                                        "same, best trials", "worst × rie", "peak CPU par.",
                                        "peak overlap (seeds)"])
    for name, s in result["results"]["summary"].items():
        summ.add(name, s["failures"], s["flatness_from_wave_6"], s["flatness_best_trials_from_wave_6"],
                 s["min_ratio_vs_run_in_executor"], s["peak_parallelism"], s["peak_overlap_seeds"])
    tables += [comp, summ, targets_table("waves targets", result["targets"])]
    render(tables, options.out, NAME, result["machine"], console=options.console)

    fig, (ax1, ax2, ax3) = new_figure(3, "waves: the seeds' workload", result["machine"], width=5.2)
    for name in names:
        xs = [r["tokens"] for r in waves[name]]
        ax1.plot(xs, [r["tokens_per_s"] for r in waves[name]], marker="o", ms=3, label=name)
        ax2.plot(xs, [r["latency_p99_ms"] for r in waves[name]], marker="o", ms=3, label=name)
    for name, style in (("tokengate", "-"), ("run_in_executor", "--")):
        xs = [r["tokens"] for r in waves[name]]
        ax3.plot(xs, [r["parallelism"] for r in waves[name]], style, marker="o", ms=3, label=f"{name}: CPU par.")
        ax3.plot(xs, [r["overlap_seeds"] for r in waves[name]], style, marker="x", ms=3,
                 label=f"{name}: overlap (seeds)")
    for ax, ylabel in ((ax1, "tokens / s"), (ax2, "latency p99 ms (creation → settle)"),
                       (ax3, "ratio to wall time")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("wave size (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    ax2.set_yscale("log")
    ax3.set_yscale("log")
    save_figure(fig, options.out, NAME)
