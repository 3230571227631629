"""Soak: a real ``python -m example_app`` under a bounded mixed load for a few minutes stays flat and settled.

The load (3 threads on 127.0.0.1) cycles light, heavy, sticky, ordered,
retried, batch and process-lane (``/cpu``) calls, every 25th batch of a
thread a spike the quarantine holds; it starts once ``/ready`` says the
worker processes are up, as a load balancer would. Beside it, an operator polls the admin API (stats, quarantine
listing, metrics, operations, readiness) four times a second, and the
server's RSS and open file descriptors are sampled every 2 s.

Asserted (no timing): every answer is the endpoint's normal one (a
quarantined spike's 409 included); every admin probe answers 200; after the
warm-up (the first quarter) RSS grows by at most ``RSS_TOLERANCE_MB`` and the
open descriptors by at most ``FD_TOLERANCE``, and the worker processes'
summed RSS by at most ``RSS_TOLERANCE_MB`` too (no process restarted) (the median of the last three
samples against the median of the first three after the warm-up); when the
load stops, every accepted call settles (``inflight`` 0, accepted ==
settled); the server logs no traceback.

Measured and printed, never asserted (the machine is shared and noisy): the
admin endpoints' latency p50/p99/max overall and per window, requests per
second, the RSS and descriptor series. The figures are also written to
``soak-report.json`` in the test's temporary directory.

``TOKENGATE_SOAK_SECONDS`` sets the duration (default 120: the CI part);
run it longer by hand, e.g.
``TOKENGATE_SOAK_SECONDS=600 .venv/bin/python -m pytest tests/example_app/test_example_app_soak.py -s``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from _example_load import Load, classify, standard_mix
from server_process import free_port, python_path_with, running_server

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "soak-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SOAK_SECONDS = float(os.environ.get("TOKENGATE_SOAK_SECONDS", "120"))
WARM_UP_SHARE = 0.25
SAMPLE_EVERY = 2.0
PROBE_EVERY = 0.25
RSS_TOLERANCE_MB = 16.0
FD_TOLERANCE = 6
ADMIN_PROBES = ["/tokengate/stats", "/tokengate/quarantine?limit=50", "/tokengate/metrics",
                "/tokengate/operations", "/tokengate/ready"]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


class Operator(threading.Thread):
    """Polls the admin API and records each probe's status and latency; bounded in count and time."""

    def __init__(self, base: str, stop: threading.Event, max_seconds: float) -> None:
        super().__init__(name="soak-operator", daemon=True)
        self.base, self.stop_event, self.max_seconds = base, stop, max_seconds
        self.probes: list[tuple[float, str, int, float]] = []  # (at, path, status, seconds)

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client(base_url=self.base, headers=AUTH, timeout=10) as client:
            for i in range(int(self.max_seconds / PROBE_EVERY) + 1):
                if self.stop_event.is_set() or time.monotonic() >= deadline:
                    return
                path = ADMIN_PROBES[i % len(ADMIN_PROBES)]
                start = time.perf_counter()
                status = client.get(path).status_code
                self.probes.append((time.monotonic(), path, status, time.perf_counter() - start))
                self.stop_event.wait(PROBE_EVERY)


@pytest.mark.slow
@pytest.mark.timeout(SOAK_SECONDS + 120)
def test_soak_rss_and_descriptors_stay_flat_and_every_call_settles(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "example_app", "--port", str(port), "--log-level", "warning",
            "--quarantine-db", str(tmp_path / "quarantine.sqlite3")]
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": python_path_with(REPO),
           "TOKENGATE_ADMIN_TOKEN": ADMIN_TOKEN}
    samples: list[tuple[float, float, int, float]] = []  # (at, rss MB, open fds, worker processes' rss MB)
    with running_server(argv, cwd=tmp_path, env=env, log=tmp_path / "server.log",
                        health_path="/tokengate/health", port=port) as server:
        process = psutil.Process(server.proc.pid)
        with httpx.Client(base_url=server.base, timeout=10) as client:
            for _ in range(600):  # the worker processes start with the server: wait (bounded) until they are up
                if client.get("/tokengate/ready").status_code == 200:
                    break
                time.sleep(0.05)  # polling another process: there is no event to wait on
            workers = [w for w in client.get("/tokengate/workers", headers=AUTH).json() if w["lane"] == "process"]
            children = [psutil.Process(w["process"]["pid"]) for w in workers]
            assert children and all(w["process"]["state"] == "idle" for w in workers), workers
            for i in range(5):  # teach the quarantine the usual batch size
                assert client.post("/process", json={"items": [i, 1, 2]}).status_code == 200
        stop = threading.Event()
        load = Load(server.base, standard_mix(spike_every=25), threads=3, max_requests_per_thread=1_000_000,
                    max_seconds=SOAK_SECONDS + 10)
        operator = Operator(server.base, stop, SOAK_SECONDS + 10)
        started = time.monotonic()
        load.start()
        operator.start()
        # Given the load running for SOAK_SECONDS, sample the server's memory and descriptors
        while time.monotonic() - started < SOAK_SECONDS:
            assert server.proc.poll() is None, server.output()[-5000:]
            samples.append((time.monotonic() - started, process.memory_info().rss / 2**20, process.num_fds(),
                            sum(child.memory_info().rss for child in children) / 2**20))
            stop.wait(SAMPLE_EVERY)
        load.stop()
        stop.set()
        load.join(40)
        operator.join(15)
        elapsed = time.monotonic() - started
        # When the load has stopped, Then every accepted call settles
        with httpx.Client(base_url=server.base, headers=AUTH, timeout=10) as client:
            deadline = time.monotonic() + 30
            counts = client.get("/tokengate/stats").json()["counts"]
            while counts["inflight"] and time.monotonic() < deadline:
                time.sleep(0.1)  # polling another process: there is no event to wait on
                counts = client.get("/tokengate/stats").json()["counts"]
            processes = [w["process"] for w in client.get("/tokengate/workers", headers=AUTH).json()
                         if w["lane"] == "process"]
        output = server.output()

    assert counts["inflight"] == 0 and counts["accepted"] == counts["settled"], counts
    assert "Traceback" not in output, output[-20000:]
    outcomes = load.snapshot()
    verdicts = Counter(classify(o, load.by_name[o.name].normal) for o in outcomes)
    bad = [o for o in outcomes if classify(o, load.by_name[o.name].normal) != "normal"]
    assert not bad, f"{len(bad)} answers were not the endpoint's normal one, e.g. {bad[:5]}; {verdicts}"
    assert len(outcomes) >= 100, verdicts
    by_kind = Counter(o.name for o in outcomes)
    quarantined = sum(1 for o in outcomes if o.status == 409)
    assert set(by_kind) == {r.name for r in load.mix} and quarantined >= 1, (by_kind, quarantined)
    failed_probes = [p for p in operator.probes if p[2] != 200]
    assert operator.probes and not failed_probes, failed_probes[:10]

    # RSS and descriptors: flat after the warm-up
    warm = [s for s in samples if s[0] >= WARM_UP_SHARE * SOAK_SECONDS]
    assert len(warm) >= 6, samples
    rss_start, rss_end = statistics.median(s[1] for s in warm[:3]), statistics.median(s[1] for s in warm[-3:])
    fd_start, fd_end = statistics.median(s[2] for s in warm[:3]), statistics.median(s[2] for s in warm[-3:])
    workers_start, workers_end = (statistics.median(s[3] for s in warm[:3]),
                                  statistics.median(s[3] for s in warm[-3:]))

    latencies = [p[3] * 1000 for p in operator.probes]
    window = 30.0
    windows = []
    for k in range(int(SOAK_SECONDS // window) + 1):
        in_window = [p[3] * 1000 for p in operator.probes if k * window <= p[0] - started < (k + 1) * window]
        if in_window:
            windows.append({"from_s": k * window, "probes": len(in_window), "p99_ms": round(_percentile(in_window, 0.99), 1)})
    report: dict[str, Any] = {
        "seconds": round(elapsed, 1), "requests": len(outcomes), "requests_per_s": round(len(outcomes) / elapsed, 1),
        "by_kind": dict(by_kind), "quarantined": quarantined, "settled": counts["settled"],
        "rss_mb": {"first": round(samples[0][1], 1), "after_warm_up": round(rss_start, 1), "end": round(rss_end, 1),
                   "growth_after_warm_up": round(rss_end - rss_start, 1), "tolerance": RSS_TOLERANCE_MB},
        "worker_processes": {"count": len(processes), "calls": sum(p["calls"] for p in processes),
                             "restarts": sum(p["restarts"] for p in processes),
                             "rss_mb_first": round(samples[0][3], 1), "rss_mb_after_warm_up": round(workers_start, 1),
                             "rss_mb_end": round(workers_end, 1),
                             "growth_after_warm_up": round(workers_end - workers_start, 1)},
        "open_fds": {"first": samples[0][2], "after_warm_up": fd_start, "end": fd_end, "tolerance": FD_TOLERANCE},
        "admin_ms": {"probes": len(latencies), "p50": round(_percentile(latencies, 0.5), 1),
                     "p99": round(_percentile(latencies, 0.99), 1), "max": round(max(latencies), 1),
                     "share_over_100ms": round(sum(1 for v in latencies if v > 100) / len(latencies), 4),
                     "p99_per_30s_window": windows},
    }
    (tmp_path / "soak-report.json").write_text(json.dumps(report, indent=2))
    print("\nsoak report:", json.dumps(report, indent=2))
    assert rss_end - rss_start <= RSS_TOLERANCE_MB, report
    assert fd_end - fd_start <= FD_TOLERANCE, report
    assert sum(p["restarts"] for p in processes) == 0 and sum(p["calls"] for p in processes) >= by_kind["cpu"], report
    assert workers_end - workers_start <= RSS_TOLERANCE_MB, report
