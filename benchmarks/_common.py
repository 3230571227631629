"""Shared plumbing for every benchmark: options, machine description, statistics, targets, result files.

Every benchmark returns one JSON-ready dict with the same top-level keys
(``benchmark``, ``machine``, ``config``, ``contenders``, ``results``,
``targets``, ``notes``, ``duration_s``) and writes it next to its plot.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = [
    "BenchOptions",
    "Target",
    "machine_info",
    "percentile",
    "median",
    "summarize_us",
    "new_result",
    "write_result",
    "interleave",
    "settle",
    "ratio",
    "finish",
]

SCHEMA_VERSION = 1


@dataclass
class BenchOptions:
    """Options every benchmark understands (the per-benchmark sizes live in ``sizes``).

    ``quick`` picks tiny sizes; ``progress`` shows a rich progress bar on long
    runs; ``console`` prints the table (tests turn both off).
    """

    out: Path = Path("bench-results")
    quick: bool = False
    repeats: int | None = None
    progress: bool = True
    console: bool = True
    sizes: dict[str, Any] = field(default_factory=dict)

    def size(self, key: str, full: Any, quick: Any) -> Any:
        """The size *key*: from the command line if given, else the quick or full default."""
        value = self.sizes.get(key)
        if value is not None:
            return value
        return quick if self.quick else full

    def reps(self, full: int = 3, quick: int = 1) -> int:
        """How many interleaved repeats to run (``--repeats`` wins)."""
        if self.repeats is not None:
            if self.repeats < 1:
                raise ValueError(f"repeats must be >= 1, got {self.repeats!r}")
            return self.repeats
        return quick if self.quick else full


@dataclass(frozen=True)
class Target:
    """One pass/fail target: ``measured <op> threshold``. Reported, never asserted."""

    name: str
    measured: float | None
    threshold: float
    op: str  # ">=" or "<="
    unit: str = "x"
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.measured is None or math.isnan(self.measured):
            return None
        return self.measured >= self.threshold if self.op == ">=" else self.measured <= self.threshold

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "n/a"}[self.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": None if self.measured is None else round(self.measured, 4),
            "op": self.op,
            "threshold": self.threshold,
            "unit": self.unit,
            "pass": self.passed,
            "verdict": self.verdict,
            "note": self.note,
        }


def _gil_status() -> str:
    probe = getattr(sys, "_is_gil_enabled", None)
    if probe is None:
        return "enabled (this build has no free-threading support; sys._is_gil_enabled absent)"
    return "enabled" if probe() else "disabled (free-threaded build)"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return platform.processor() or None


def _cgroup_cpu_limit() -> str | None:
    try:
        return Path("/sys/fs/cgroup/cpu.max").read_text(encoding="utf-8").strip()
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPUs, Python build, GIL, tokengate version, date."""
    import psutil

    import tokengate

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    mem = psutil.virtual_memory().total
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu_model": _cpu_model(),
        "cgroup_cpu_max": _cgroup_cpu_limit(),
        "memory_gb": round(mem / 2**30, 1),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_build": " ".join(platform.python_build()),
        "gil": _gil_status(),
        "platform": platform.platform(),
        "tokengate_version": getattr(tokengate, "__version__", "unknown"),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1_5_15": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    # Other processes on the machine skew every number: record how busy it was.
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (NaN for no data): the same definition tokengate's stats use."""
    if not values:
        return math.nan
    data = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(data)))
    return data[min(rank, len(data)) - 1]


def median(values: Iterable[float]) -> float:
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2


def summarize_us(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/max/mean of durations given in seconds, returned in microseconds."""
    if not seconds:
        return {"p50_us": math.nan, "p99_us": math.nan, "max_us": math.nan, "mean_us": math.nan, "n": 0}
    return {
        "p50_us": percentile(seconds, 50) * 1e6,
        "p99_us": percentile(seconds, 99) * 1e6,
        "max_us": max(seconds) * 1e6,
        "mean_us": sum(seconds) / len(seconds) * 1e6,
        "n": len(seconds),
    }


def ratio(a: float | None, b: float | None) -> float:
    """a / b, NaN when either is missing or b is zero."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def interleave(repeats: int, names: Sequence[str]) -> Iterator[tuple[int, str]]:
    """``(repeat, name)`` round by round, each round starting one contender later (A B C, B C A, C A B, ...).

    Interleaving makes noise that drifts over a run hit every contender alike;
    rotating keeps a contender from always running first in its round, or always
    right after the same other one (whose leftovers, a warm cache or a busy
    core, it would otherwise inherit every time).
    """
    n = len(names)
    for r in range(repeats):
        for i in range(n):
            yield r, names[(r + i) % n]


def paired(base: Sequence[float], other: Sequence[float], *, resamples: int = 2000) -> dict[str, Any]:
    """``base[i] / other[i]`` round by round (two trials that ran seconds apart), summarised.

    For times, pass the anchor as *base* and the contender as *other*: a ratio
    above 1 means the contender was faster in that round. Returns the median
    paired ratio, a 95 % bootstrap interval of that median (percentile method,
    fixed seed, so a result file is reproducible from its raw trials), the share
    of rounds the contender won, and the ratios themselves. Noise that drifts
    over the run cancels within a pair; it does not in a ratio of two medians.
    """
    ratios = [b / o for b, o in zip(base, other) if o > 0 and not (math.isnan(b) or math.isnan(o))]
    if not ratios:
        return {"median": math.nan, "ci95": [math.nan, math.nan], "won": math.nan, "rounds": 0, "ratios": []}
    rng = random.Random(0)
    n = len(ratios)
    medians = sorted(median(rng.choices(ratios, k=n)) for _ in range(resamples))
    return {
        "median": median(ratios),
        "ci95": [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]],
        "won": sum(1 for r in ratios if r > 1.0) / n,
        "rounds": n,
        "ratios": ratios,
    }


def paired_note(p: dict[str, Any]) -> str:
    """One line for a target's note: the :func:`paired` statistic of a comparison."""
    lo, hi = p["ci95"]
    return (f"round by round: median {p['median']:.3f}x, 95% CI {lo:.3f}-{hi:.3f}x, "
            f"the lane faster in {round(p['won'] * p['rounds'])} of {p['rounds']} rounds")


async def settle() -> None:
    """Free the previous trial's objects before a timed trial, so no contender pays for another's garbage.

    ``gc.collect()`` alone is not enough: until the current task step ends, the
    event loop's ``_run_once`` still holds the handle that woke the task, and
    through it the last ``gather``'s future, its children and their results
    (65,536 tokens and ~300 MB of results after the largest wave). Without the
    yields they are freed inside the *next* timed trial, billed to whoever
    runs next.
    """
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gc.collect()


def new_result(name: str, options: BenchOptions, config: dict[str, Any]) -> dict[str, Any]:
    """The common skeleton of a result (filled in by the benchmark)."""
    return {
        "benchmark": name,
        "schema": SCHEMA_VERSION,
        "machine": machine_info(),
        "config": {"quick": options.quick, **config},
        "contenders": {},
        "results": {},
        "targets": [],
        "notes": [],
        "duration_s": None,
        "_t0": time.perf_counter(),
    }


def _clean(value: Any) -> Any:
    # JSON has no NaN: write null instead, and round floats for readability.
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return None
        return round(value, 6)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def finish(result: dict[str, Any], targets: Sequence[Target]) -> dict[str, Any]:
    """Attach targets and the duration; return the cleaned, JSON-ready result."""
    result["targets"] = [t.to_dict() for t in targets]
    result["machine"]["load_average_at_end"] = _loadavg()
    result["duration_s"] = time.perf_counter() - result["_t0"]
    cleaned: dict[str, Any] = _clean(result)
    return cleaned


def write_result(result: dict[str, Any], out: Path) -> Path:
    """Write ``<out>/<benchmark>.json`` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['benchmark']}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
