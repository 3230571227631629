"""The standard set's summary: every target of every benchmark in one table and one JSON file."""

from __future__ import annotations

from typing import Any

from ._common import BenchOptions, machine_info, write_result
from ._report import TableData, render

__all__ = ["summarize"]


def summarize(results: dict[str, dict[str, Any]], errors: dict[str, str], options: BenchOptions) -> dict[str, Any]:
    """Write ``standard.json`` / ``standard.md`` with every target's verdict; print the table."""
    machine = machine_info()
    table = TableData("standard set: targets", ["benchmark", "target", "measured", "needed", "verdict"])
    rows: list[dict[str, Any]] = []
    for name, result in results.items():
        for t in result["targets"]:
            rows.append({"benchmark": name, **t})
            measured = "—" if t["measured"] is None else f"{t['measured']:.3g}{t['unit']}"
            table.add(name, t["name"], measured, f"{t['op']} {t['threshold']:g}{t['unit']}", t["verdict"])
    for name, err in errors.items():
        table.add(name, "benchmark crashed", err, "", "FAIL")
    summary = {
        "benchmark": "standard",
        "machine": machine,
        "config": {"quick": options.quick, "repeats": options.repeats},
        "ran": list(results),
        "errors": errors,
        "targets": rows,
        "durations_s": {n: r.get("duration_s") for n, r in results.items()},
    }
    write_result(summary, options.out)
    render([table], options.out, "standard", machine, console=options.console)
    return summary
