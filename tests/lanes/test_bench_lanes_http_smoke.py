"""The lanes_http benchmark runs end to end with tiny sizes (shape only, never a timing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks._common import BenchOptions
from benchmarks._http_wrk import find_wrk


@pytest.mark.slow
@pytest.mark.skipif(find_wrk() is None, reason="wrk is not installed")
def test_bench_lanes_http_runs(tmp_path: Path) -> None:
    from benchmarks import bench_lanes_http

    # Given the benchmark cut to tiny sizes, When it runs
    options = BenchOptions(out=tmp_path, quick=True, repeats=1, progress=False, console=False,
                           sizes={"flood_seconds": 1.0, "max_flood_seconds": 3.0, "idle_seconds": 0.3, "probes": 5,
                                  "clients": 8, "cpu_ms": 2.0})
    result = bench_lanes_http.run(options)
    # Then both servers were flooded and probed, the CPU endpoint answered, and both targets were judged
    summary = result["results"]["summary"]
    for lane in ("process", "thread"):
        run = result["results"]["runs"][lane][0]
        assert run["flood"]["cpu_requests"] > 0 and run["flood"]["n"] > 0 and run["idle"]["n"] > 0
        assert summary[lane]["cpu_rps"] > 0
    assert [t["verdict"] in ("PASS", "FAIL") for t in result["targets"]] == [True, True]
    assert (tmp_path / "lanes_http.json").exists() and (tmp_path / "lanes_http.md").exists()
