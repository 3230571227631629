"""``python -m tokengate info``: print the detected topology and the routing table."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from . import __version__
from .tags import WEIGHTS, declared_tags
from .topology import detect_topology, routing_table


def render_info(num_cores: int | None, workers_per_core: int, reserve: int) -> str:
    """The start-up banner: topology, routing table per weight, workers, reserves."""
    topo = detect_topology()
    cores = num_cores or topo.usable_cpus
    table = routing_table(cores, workers_per_core, reserve)
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    lines = [
        f"tokengate {__version__} on Python {sys.version.split()[0]} (GIL {'enabled' if gil else 'disabled'})",
        f"logical CPUs {topo.logical_cpus}, usable by this process {topo.usable_cpus} "
        f"(cpu set {list(topo.cpu_set)}), physical cores {topo.physical_cores}",
        f"worker domains ('cores') {cores} x {workers_per_core} workers = {cores * workers_per_core} threads; "
        f"bulkhead reserve {reserve} worker(s) per domain",
        "",
        f"{'weight':<8} {'domains (preference order)':<36} {'max threads':>11}",
    ]
    max_workers = table.to_dict()["max_workers"]
    assert isinstance(max_workers, dict)
    for weight in WEIGHTS:
        order = " -> ".join(str(c) for c in table.allowed[weight])
        lines.append(f"{weight:<8} {order:<36} {max_workers[weight]:>11}")
    lines.append("")
    lines.append(f"{'domain':<8} {'owners':<24} workers a spilling class may use")
    for core in range(1, cores + 1):
        owners = ", ".join(sorted(table.owners[core])) or "-"
        low = min(reserve, workers_per_core)
        spill = f"w{low}..w{workers_per_core - 1}" if low < workers_per_core else "none"
        lines.append(f"{core:<8} {owners:<24} {spill}")
    lines.append("")
    lines.append("declared tags: " + ", ".join(sorted(declared_tags())))
    lines.append("'domains' are groups of worker threads, not CPU pins; under the GIL pure-Python work")
    lines.append("does not run in parallel: threads help blocking I/O and code that releases the GIL.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokengate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the detected topology and routing table")
    info.add_argument("--num-cores", type=int, default=None)
    info.add_argument("--workers-per-core", type=int, default=4)
    info.add_argument("--reserve", type=int, default=1)
    info.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if args.command == "info":
        import tokengate  # noqa: F401 - registers every policy's tags

        if args.json:
            topo = detect_topology()
            cores = args.num_cores or topo.usable_cpus
            table = routing_table(cores, args.workers_per_core, args.reserve)
            print(json.dumps({"topology": topo.to_dict(), "routing": table.to_dict()}, indent=2))
        else:
            print(render_info(args.num_cores, args.workers_per_core, args.reserve))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
