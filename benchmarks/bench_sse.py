"""``python -m benchmarks.bench_sse``: what N open ``/events`` streams cost the server's event loop.

A real uvicorn (a subprocess on 127.0.0.1) serves an app with the tokengate
lifespan and the admin router (``sse_interval`` 1 s). This process opens
``--streams`` authenticated ``/events`` connections (raw sockets, so the
client stays cheap), waits until every stream got its first event, then for
``--seconds`` measures:

* **CPU per tick**: the server process's CPU seconds (all threads; the
  workers are idle, so this is the loop) over the window, divided by the
  number of ticks (window ÷ ``sse_interval``). A baseline window with no
  stream open is measured first and reported beside it;
* **events delivered** per stream per tick (1.0 = every stream got every tick;
  below that, the loop could not keep up), and the CPU per delivered event
  (the view that stays honest when the loop is saturated);
* **light-request latency**: sequential ``GET /tokengate/health`` probes (an
  ``async def`` answered by the loop alone) during the window, p50/p99/max.

Everything is bounded: the connection count, the window, every socket read
(timeouts) and the server (SIGTERM, then SIGKILL). Before/after comparisons
run the same script against another checkout with ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

TOKEN = "bench-sse-token-0123456789abcdef"
PREFIX = "/tokengate"
_REPO = Path(__file__).resolve().parent.parent
_EVENT = b"event: stats"


def make_app(interval: float, max_streams: int) -> Any:
    """The served app: tokengate lifespan, admin router, and ``/work`` to fill the history."""
    from fastapi import FastAPI

    from tokengate import task_token_guard
    from tokengate_fastapi import admin_router, tokengate_lifespan

    @task_token_guard(operation_type="bench.sse.work", tags={"weight": "light"})
    def work(x: int) -> int:
        return x * x

    app = FastAPI(lifespan=tokengate_lifespan(num_cores=2, workers_per_core=2, drain_timeout=2.0))
    options: dict[str, Any] = {"token": TOKEN, "sse_interval": interval, "sse_max_duration": 3600.0}
    if "sse_max_streams" in inspect.signature(admin_router).parameters:  # absent before the stream cap
        options["sse_max_streams"] = max_streams
    app.include_router(admin_router(**options), prefix=PREFIX)

    @app.post("/work/{n}")
    async def run_work(n: int) -> dict[str, int]:
        total = 0
        for i in range(n):
            total += await work(i)
        return {"total": total}

    return app


def serve(port: int, interval: float, max_streams: int) -> None:
    """Run the app under uvicorn on 127.0.0.1:*port* until SIGTERM."""
    import uvicorn

    _raise_fd_limit()
    uvicorn.run(make_app(interval, max_streams), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, backlog=4096, timeout_graceful_shutdown=2)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _request(port: int, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection (Connection: close); (status, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class Stream:
    """One raw ``/events`` connection that counts the events it receives."""

    def __init__(self) -> None:
        self.events = 0
        self.status = 0
        self.first = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    async def run(self, port: int, read_timeout: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {PREFIX}/events?access_token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), read_timeout)
            self.status = int(head.split(b" ", 2)[1])
            tail = b""
            while True:
                chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
                if not chunk:
                    return
                data = tail + chunk
                self.events += data.count(_EVENT)
                tail = data[-(len(_EVENT) - 1):]
                if self.events and not self.first.done():
                    self.first.set_result(None)
        finally:
            if not self.first.done():
                self.first.set_result(None)
            writer.close()


def probe(port: int, seconds: float, every: float) -> list[float]:
    """Sequential ``GET /tokengate/health`` on fresh blocking connections for *seconds*; latencies in seconds."""
    latencies = []
    until = time.monotonic() + seconds
    request = f"GET {PREFIX}/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < until:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        if data.startswith(b"HTTP/1.1 200"):
            latencies.append(time.perf_counter() - t0)
        time.sleep(every)
    return latencies


async def _probe(port: int, seconds: float, every: float) -> list[float]:
    # In its own process: this process's loop is busy reading the streams, which would add to the latency.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bench_sse", "--probe", "--port", str(port), "--seconds", str(seconds),
        "--probe-every", str(every), stdout=asyncio.subprocess.PIPE, env=_env())
    out, _ = await asyncio.wait_for(proc.communicate(), seconds + 120)
    latencies: list[float] = json.loads(out)
    return latencies


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(_REPO)]))}


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    _raise_fd_limit()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_sse", "--serve", "--port", str(port),
                             "--interval", str(args.interval), "--max-streams", str(args.streams)],
                            env=_env(), stdin=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    streams: list[Stream] = []
    try:
        deadline = time.monotonic() + 30
        while True:  # bounded wait until the server answers
            try:
                if (await _request(port, "GET", f"{PREFIX}/health", timeout=2))[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the benchmark server did not start")
            await asyncio.sleep(0.1)
        status, _ = await _request(port, "POST", "/work/200", timeout=30)  # history and reputation rows
        assert status == 200, status
        snapshot_bytes = len((await _request(port, "GET", f"{PREFIX}/events?max_events=1", timeout=30))[1])

        def cpu() -> float:
            t = ps.cpu_times()
            return float(t.user + t.system)

        # Baseline: the idle server over the same window.
        c0, t0 = cpu(), time.monotonic()
        idle_probe = await _probe(port, args.seconds, args.probe_every)
        idle_cpu = (cpu() - c0) / (time.monotonic() - t0)

        # Open the streams (bounded: a fixed count, each read under a timeout).
        for _ in range(args.streams):
            stream = Stream()
            stream.task = asyncio.create_task(stream.run(port, read_timeout=args.seconds + 60))
            streams.append(stream)
        await asyncio.wait_for(asyncio.gather(*(s.first for s in streams)), 120)
        statuses: dict[int, int] = {}
        for s in streams:
            statuses[s.status] = statuses.get(s.status, 0) + 1
        await asyncio.sleep(args.interval * 2)  # let the stream set settle

        e0 = sum(s.events for s in streams)
        c0, t0 = cpu(), time.monotonic()
        probe = await _probe(port, args.seconds, args.probe_every)
        elapsed = time.monotonic() - t0
        busy_cpu = cpu() - c0
        delivered = sum(s.events for s in streams) - e0
        open_streams = sum(1 for s in streams if s.status == 200 and s.task is not None and not s.task.done())
        ticks = elapsed / args.interval
        return {
            "streams": args.streams,
            "statuses": statuses,
            "open_streams": open_streams,
            "interval_s": args.interval,
            "window_s": round(elapsed, 2),
            "snapshot_event_bytes": snapshot_bytes,
            "idle_cpu_ms_per_s": round(idle_cpu * 1000, 2),
            "cpu_ms_per_tick": round(busy_cpu / ticks * 1000, 2),
            "cpu_ms_per_tick_minus_idle": round((busy_cpu / ticks - idle_cpu * args.interval) * 1000, 2),
            "events_per_stream_per_tick": round(delivered / max(1, open_streams) / ticks, 3),
            # The saturation-proof view: a loop at 100 % cannot spend more per tick, only deliver less.
            "cpu_us_per_event_delivered": round(busy_cpu / max(1, delivered) * 1e6, 1),
            "probe_idle_ms": {"p50": round(_pct(idle_probe, 50) * 1000, 2),
                              "p99": round(_pct(idle_probe, 99) * 1000, 2)},
            "probe_ms": {"n": len(probe), "p50": round(_pct(probe, 50) * 1000, 2),
                         "p99": round(_pct(probe, 99) * 1000, 2),
                         "max": round(max(probe, default=float("nan")) * 1000, 2),
                         "mean": round(statistics.fmean(probe) * 1000, 2) if probe else None},
        }
    finally:
        for s in streams:
            if s.task is not None:
                s.task.cancel()
        await asyncio.gather(*(s.task for s in streams if s.task is not None), return_exceptions=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_sse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000, help="open /events streams (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement window (default 10)")
    parser.add_argument("--interval", type=float, default=1.0, help="the router's sse_interval (default 1)")
    parser.add_argument("--probe-every", type=float, default=0.05, help="seconds between latency probes")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--max-streams", type=int, default=1000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port, args.interval, args.max_streams)
        return
    if args.probe:
        print(json.dumps(probe(args.port, args.seconds, args.probe_every)))
        return
    if not 1 <= args.streams <= 10_000 or not 0 < args.seconds <= 600:
        parser.error("--streams must be in 1..10000 and --seconds in (0, 600]")
    result = asyncio.run(measure(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
