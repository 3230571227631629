"""The process-child benchmark runs end to end with tiny sizes (shape only, never a timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_process_child_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_process_child.py"), "--quick", "--calls", "20",
         "--batch", "3000", "--rounds", "1", "--max-seconds", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert set(data) >= {"round_trip_us", "batch_calls_per_s", "startup_s"}
    assert all(values and all(v > 0 for v in values) for values in data["round_trip_us"].values())
    assert all(values and all(v > 0 for v in values) for values in data["batch_calls_per_s"].values())
