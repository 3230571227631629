"""memory: sustained trivial load must not grow the process or leave tokens behind.

For each contender (TokenGate, then ``run_in_executor``; one after the other,
because RSS is a whole-process number): warm up, ``settle()`` (yields, then
``gc.collect()``), note RSS; then run *tokens* trivial calls in batches of
*batch_size* (each batch gathered before the next), sampling RSS as it goes;
then ``settle()`` and note RSS again. Growth = end − after warm-up, both taken
once every earlier call has been freed (``alive_at_baseline`` checks the first).

After settling, the live objects are counted with ``gc``: ``TaskToken``
instances for TokenGate, ``asyncio.Future`` instances for the anchor (the
benchmark holds none itself at that point).

Targets: TokenGate growth ≤ 30 MB; 0 ``TaskToken`` objects alive after settling.
Caveat: both run in one process, so memory the first contender returned to
the allocator may be reused by the second (the second can look smaller).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Callable, Sequence

import psutil

from tokengate import TaskToken

from ._common import BenchOptions, Target, finish, new_result, settle, write_result
from ._contenders import Contender, make_contenders, parse_contenders, started
from ._report import TableData, new_figure, progress, render, save_figure, targets_table
from ._workloads import noop

__all__ = ["run", "count_alive"]

NAME = "memory"
MB = 2**20
_perf = time.perf_counter


def count_alive(kind: type) -> int:
    """How many objects of *kind* the garbage collector can see, after a full collection.

    Tasks are not counted: the benchmark's own task is a Future too.
    """
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind) and not isinstance(o, asyncio.Task))


async def _batches(c: Contender, count: int, size: int, on_batch: Callable[[int], None] | None = None) -> None:
    call = c.call
    for b in range(count):
        await asyncio.gather(*[call(noop) for _ in range(size)])
        if on_batch is not None:
            on_batch(b)


async def _one(c: Contender, tokens: int, size: int, warm_batches: int, options: BenchOptions,
               kwargs: dict[str, Any]) -> dict[str, Any]:
    proc = psutil.Process()
    batches = max(1, tokens // size)
    every = max(1, batches // 100)
    samples: list[tuple[int, float]] = []
    kind = TaskToken if c.name == "tokengate" else asyncio.Future
    async with started([c]):
        await _batches(c, warm_batches, size)
        await settle()  # frees the last warm-up batch too: gc.collect() alone leaves it alive (see settle)
        alive_baseline = count_alive(kind)  # before the RSS reading: the scan's own allocation is baseline
        rss_warm = proc.memory_info().rss
        samples.append((0, rss_warm / MB))

        t0 = _perf()
        with progress(options.progress, batches, f"memory: {c.name}") as advance:

            def sample(b: int) -> None:
                advance(1)
                if (b + 1) % every == 0 or b + 1 == batches:
                    samples.append(((b + 1) * size, proc.memory_info().rss / MB))

            await _batches(c, batches, size, sample)
        elapsed = _perf() - t0
        await settle()  # frees the last batch (see settle)
        rss_end = proc.memory_info().rss
        alive_running = count_alive(kind)
        inflight = None
        if c.name == "tokengate":
            coordinator = getattr(c, "coordinator", None)
            inflight = coordinator.inflight if coordinator is not None else None
        describe = c.describe()
    alive_stopped = count_alive(kind)
    return {
        "tokens": batches * size,
        "batches": batches,
        "batch_size": size,
        "warmup_batches": warm_batches,
        "tokens_per_s": batches * size / elapsed,
        "rss_after_warmup_mb": rss_warm / MB,
        "rss_end_mb": rss_end / MB,
        "rss_growth_mb": (rss_end - rss_warm) / MB,
        "rss_peak_sampled_mb": max(s[1] for s in samples),
        "alive_kind": kind.__name__,
        "alive_at_baseline": alive_baseline,
        "alive_after_settle": alive_running,
        "alive_after_stop": alive_stopped,
        "inflight_after_settle": inflight,
        "rss_samples": samples,
        "_describe": describe,
    }


async def _measure(options: BenchOptions, names: Sequence[str], tokens: int, size: int, warm: int,
                   kwargs: dict[str, Any], result: dict[str, Any]) -> None:
    per: dict[str, Any] = {}
    for c in make_contenders(names, kwargs):
        gc.collect()
        per[c.name] = await _one(c, tokens, size, warm, options, kwargs)
        result["contenders"][c.name] = per[c.name].pop("_describe")
    result["results"]["per_contender"] = per


def run(options: BenchOptions) -> dict[str, Any]:
    """Run the memory benchmark; print its tables, write JSON, Markdown and PNG; return the result."""
    tokens = int(options.size("tokens", 1_000_000, 50_000))
    size = int(options.size("batch_size", 1000, 1000))
    if tokens < size or size < 1:
        raise ValueError(f"tokens ({tokens!r}) must be >= batch_size ({size!r}) >= 1")
    warm = max(5, min(50, tokens // size // 20))
    names = parse_contenders(options.sizes.get("contenders"), default=("tokengate", "run_in_executor"))
    kwargs: dict[str, Any] = {}
    result = new_result(NAME, options, {"tokens": tokens, "batch_size": size, "warmup_batches": warm,
                                        "contenders": list(names), "coordinator_kwargs": kwargs})
    asyncio.run(_measure(options, names, tokens, size, warm, kwargs, result))
    result["notes"] += [
        "contenders run one after the other in one process (RSS is per process); TokenGate first",
        "growth = RSS after the run - RSS after warm-up, both after settle() (yields, then gc.collect())",
        "alive_after_settle counts TaskToken (tokengate) or asyncio.Future (anchors; Tasks excluded) objects "
        "seen by gc "
        "while the coordinator/pool still runs; alive_after_stop after it stopped",
    ]
    tg = result["results"]["per_contender"]["tokengate"]
    targets = [
        Target("tokengate RSS growth after warm-up", tg["rss_growth_mb"], 30.0, "<=", unit=" MB"),
        Target("TaskToken objects alive after settling", float(tg["alive_after_settle"]), 0, "<=", unit=""),
    ]
    final = finish(result, targets)
    write_result(final, options.out)
    _report(final, options)
    return final


def _report(result: dict[str, Any], options: BenchOptions) -> None:
    per = result["results"]["per_contender"]
    t = TableData(f"memory: {result['config']['tokens']:,} trivial calls in batches of "
                  f"{result['config']['batch_size']:,}",
                  ["contender", "calls/s", "RSS warm MB", "RSS end MB", "growth MB", "peak MB",
                   "alive after settle", "alive after stop"])
    for name, r in per.items():
        t.add(name, r["tokens_per_s"], r["rss_after_warmup_mb"], r["rss_end_mb"], r["rss_growth_mb"],
              r["rss_peak_sampled_mb"], f"{r['alive_after_settle']} {r['alive_kind']}",
              f"{r['alive_after_stop']} {r['alive_kind']}")
    render([t, targets_table("memory targets", result["targets"])], options.out, NAME, result["machine"],
           console=options.console)
    fig, (ax,) = new_figure(1, "memory: RSS under sustained trivial load", result["machine"], width=8)
    for name, r in per.items():
        xs = [s[0] for s in r["rss_samples"]]
        ax.plot(xs, [s[1] for s in r["rss_samples"]], label=name)
    ax.set_xlabel("calls completed after warm-up")
    ax.set_ylabel("RSS MB")
    ax.legend(fontsize=8)
    save_figure(fig, options.out, NAME)
