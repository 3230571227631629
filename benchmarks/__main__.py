"""``python -m benchmarks <name> [options]``: run one benchmark, or ``standard`` for the standard set.

Examples::

    python -m benchmarks dispatch --quick
    python -m benchmarks waves --max-wave 4096 --repeats 2
    python -m benchmarks standard --out bench-results/

Each benchmark prints its tables and writes ``<out>/<name>.json``,
``<out>/<name>.md`` and ``<out>/<name>.png``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# Absolute imports: anyio.to_process (the lanes benchmark's anchor) re-runs the main module by path
# in its worker processes, where a relative import has no parent package.
from benchmarks._common import BenchOptions

BENCHMARKS: dict[str, str] = {
    "dispatch": "benchmarks.bench_dispatch",
    "waves": "benchmarks.bench_waves",
    "memory": "benchmarks.bench_memory",
    "features": "benchmarks.bench_features",
    "http": "benchmarks.bench_http",
    "lanes": "benchmarks.bench_lanes",
    "lanes_http": "benchmarks.bench_lanes_http",
    "dask": "benchmarks.bench_dask",
}
STANDARD = ("dispatch", "waves", "memory", "features", "http", "lanes", "lanes_http")


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=[*BENCHMARKS, "standard"], help="benchmark to run, or 'standard' for the set")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats per measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--contenders", default=None,
                   help="comma list from tokengate,run_in_executor,to_thread,anyio,cf_wrap_future "
                        "(tokengate and run_in_executor are always included)")
    g = p.add_argument_group("dispatch")
    g.add_argument("--batches", type=_ints, default=None, help="fan-out sizes (default 1000,20000,100000)")
    g.add_argument("--calls", type=int, default=None, help="sequential round trips (default 5000)")
    g.add_argument("--profile", action="store_true", help="also cProfile one TokenGate fan-out")
    g = p.add_argument_group("waves")
    g.add_argument("--max-wave", type=int, default=None, help="largest wave (default 65536; --quick 1024)")
    g.add_argument("--large-wave", type=int, default=None,
                   help="waves above this size run once per contender, for a shorter run (default: none; --quick 8192)")
    g = p.add_argument_group("memory")
    g.add_argument("--tokens", type=int, default=None, help="trivial tokens in total (default 1,000,000)")
    g.add_argument("--batch-size", type=int, default=None, help="tokens per sustained batch (default 1000)")
    g = p.add_argument_group("features")
    g.add_argument("--features-n", type=int, default=None, help="tokens per trial (default 20000)")
    g = p.add_argument_group("http")
    g.add_argument("--workers-per-core", type=int, default=None, help="coordinator workers per core (default 10)")
    g.add_argument("--clients", type=int, default=None, help="heavy flood clients (default 100)")
    g.add_argument("--heavy-ms", type=int, default=None, help="heavy endpoint blocking time (default 200)")
    g.add_argument("--flood-seconds", type=float, default=None, help="flood measurement window (default 12)")
    g.add_argument("--probes", type=int, default=None, help="light probes per phase, spread over its window (default 300)")
    g.add_argument("--e2e-requests", type=int, default=None, help="max requests in the rps phase (default 6000)")
    g.add_argument("--e2e-seconds", type=float, default=None, help="max seconds of the rps phase (default 8)")
    g.add_argument("--lifespan", choices=["auto", "own", "tokengate_fastapi"], default=None,
                   help="how the TokenGate app starts its coordinator (default auto: tokengate_fastapi if importable)")
    g = p.add_argument_group("lanes")
    g.add_argument("--process-workers", type=int, default=None, help="worker processes of the lane and of every "
                   "anchor pool (default: usable CPUs)")
    g.add_argument("--cpu-calls", type=int, default=None, help="CPU-bound calls gathered per trial (default 64)")
    g.add_argument("--cpu-ms", type=float, default=None, help="one CPU-bound call's size in ms of one core (default 20)")
    g.add_argument("--fan-out", type=int, default=None, help="trivial calls gathered per trial (default 20000)")
    g.add_argument("--round-trip-calls", type=int, default=None, help="sequential round trips (default 2000)")
    g.add_argument("--crash-calls", type=int, default=None, help="calls per crash storm, 1 in 10 crashes (default 200)")
    g.add_argument("--map-calls", type=int, default=None, help="calls per map trial (default 100000)")
    g.add_argument("--startup-repeats", type=int, default=None, help="fresh coordinators started (default 3)")
    return p


def options_from(ns: argparse.Namespace) -> BenchOptions:
    keys = ("contenders", "batches", "calls", "profile", "max_wave", "large_wave", "tokens", "batch_size",
            "features_n", "workers_per_core", "clients", "heavy_ms", "flood_seconds", "probes",
            "e2e_requests", "e2e_seconds", "lifespan", "process_workers", "cpu_calls", "cpu_ms", "fan_out",
            "round_trip_calls", "crash_calls", "map_calls", "startup_repeats")
    sizes: dict[str, Any] = {k: getattr(ns, k) for k in keys if getattr(ns, k) not in (None, False)}
    return BenchOptions(out=ns.out, quick=ns.quick, repeats=ns.repeats, progress=not ns.no_progress, sizes=sizes)


def runner(name: str) -> Callable[[BenchOptions], dict[str, Any]]:
    """The ``run(options)`` function of benchmark *name* (imported on demand)."""
    module = importlib.import_module(BENCHMARKS[name])
    fn: Callable[[BenchOptions], dict[str, Any]] = module.run
    return fn


def run_standard(options: BenchOptions, argv: Sequence[str]) -> dict[str, Any]:
    """Run the standard set, each benchmark in a fresh process, in order; then summarize.

    A fresh process per benchmark keeps one benchmark's heap and threads from
    skewing the next (the memory benchmark's RSS baseline above all). A
    benchmark that crashes is reported and the rest still run.
    """
    from benchmarks._standard import summarize

    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    rest = [a for a in argv if a != "standard"]
    for name in STANDARD:
        path = options.out / f"{name}.json"
        path.unlink(missing_ok=True)  # never summarize a stale result
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks", name, *rest], check=False)
        if proc.returncode == 0 and path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))
        else:
            errors[name] = f"exit status {proc.returncode} after {time.perf_counter() - t0:.1f}s"
            print(f"benchmark {name} failed: {errors[name]}", file=sys.stderr)
    return summarize(results, errors, options)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(args)
    options = options_from(ns)
    if ns.name == "standard":
        summary = run_standard(options, args)
        return 1 if summary["errors"] else 0
    runner(ns.name)(options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
