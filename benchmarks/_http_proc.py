"""One benchmark server as a subprocess: start on a free 127.0.0.1 port, wait until ready, always stop.

Thread: the benchmark's event-loop thread (``wait_ready`` is async; the rest is quick and sync).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx
import psutil

__all__ = ["Server", "Flood", "free_port", "read_schedstat", "schedstat_delta"]

_REPO = Path(__file__).resolve().parent.parent


def _child_env(core_path: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    # The children import `benchmarks` from this checkout, installed or not; *core_path* (a
    # checkout whose `tokengate` should be imported instead, for A/B runs) goes first.
    path = os.pathsep.join(filter(None, [core_path, str(_REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **(extra or {}), "PYTHONPATH": path}


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_schedstat(pid: int) -> dict[int, tuple[int, int, int]]:
    """Per thread of *pid*: (ns on CPU, ns waiting on a run queue, time slices), from ``/proc/<pid>/task``.

    Empty where ``/proc`` has no schedstat (not Linux, or the kernel lacks
    ``CONFIG_SCHEDSTATS``); a thread that exits while being read is skipped.
    """
    out: dict[int, tuple[int, int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                run, wait, slices = (int(x) for x in f.read().split()[:3])
        except (OSError, ValueError):
            continue
        out[int(tid)] = (run, wait, slices)
    return out


def schedstat_delta(pid: int, before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]],
                    requests: int) -> dict[str, Any]:
    """The event-loop thread's (the main thread: uvicorn runs the loop there) and the other threads' share.

    Per group: CPU ms and run-queue wait ms in the interval, time slices, and
    per request (*requests*: what the server answered in the interval). A
    run-queue wait is time the thread was runnable but another task held the
    CPU; time blocked on the GIL is not in it (a thread waiting for the GIL
    sleeps on a condition variable), which is why the probes also measure it.
    """
    def group(tids: list[int]) -> dict[str, float]:
        run = sum(after[t][0] - before.get(t, (0, 0, 0))[0] for t in tids)
        wait = sum(after[t][1] - before.get(t, (0, 0, 0))[1] for t in tids)
        slices = sum(after[t][2] - before.get(t, (0, 0, 0))[2] for t in tids)
        n = max(1, requests)
        return {"threads": len(tids), "cpu_ms": run / 1e6, "runqueue_wait_ms": wait / 1e6, "slices": slices,
                "cpu_us_per_request": run / 1e3 / n, "runqueue_wait_us_per_request": wait / 1e3 / n,
                "slices_per_request": slices / n,
                "runqueue_wait_us_per_slice": wait / 1e3 / max(1, slices)}

    return {"loop_thread": group([t for t in after if t == pid]),
            "other_threads": group([t for t in after if t != pid])}


class Server:
    """``python -m benchmarks._http_server --kind <kind>`` on a free port; its stderr goes to a log file.

    *app* names this server in results and logs (several servers may share a
    kind); *threads* is passed to a plain app (``0``: anyio's default limiter);
    *core_path* and *env* are for diagnostics (``_http_diag``): a checkout whose
    ``tokengate`` the server imports, and extra environment variables.
    """

    def __init__(self, kind: str, cfg: dict[str, Any], out: Path, *, app: str | None = None,
                 threads: int | None = None, core_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.core_path = core_path
        self.env = env
        self.app = app or kind
        self.threads = threads
        self.cfg = cfg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"http-server-{self.app}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = _child_env(self.core_path, self.env)
        cmd = [sys.executable, "-m", "benchmarks._http_server", "--kind", self.kind, "--port", str(self.port),
               "--num-cores", str(self.cfg["num_cores"]), "--workers-per-core", str(self.cfg["workers_per_core"]),
               "--heavy-ms", str(self.cfg["heavy_ms"]), "--lifespan", self.cfg.get("lifespan", "auto")]
        if self.threads is not None:
            cmd += ["--threads", str(self.threads)]
        # With a core_path the server starts there: the working directory comes first on sys.path.
        self.proc = subprocess.Popen(cmd, cwd=self.core_path or _REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self._ps = psutil.Process(self.proc.pid)

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Poll ``/health`` until it answers (bounded); return its JSON. Raises if the server died or timed out."""
        deadline = time.perf_counter() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} server exited early; see {self.log_path}:\n{self._tail()}")
                try:
                    r = await client.get("/health")
                    if r.status_code == 200:
                        health: dict[str, Any] = r.json()
                        return health
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.kind} server not ready after {timeout}s; see {self.log_path}:\n{self._tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the server process has used so far (all its threads)."""
        if self._ps is None:
            return float("nan")
        t = self._ps.cpu_times()
        return float(t.user + t.system)

    def schedstat(self) -> dict[int, tuple[int, int, int]]:
        """Per-thread scheduler figures of the server process now (``read_schedstat``)."""
        return {} if self.proc is None else read_schedstat(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully, lifespan included), then SIGKILL after 20 s. Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            return ""


class Flood:
    """The httpx flood generator (``_http_flood``) as an asyncio subprocess: start, wait for ready, stop, collect.

    The fallback when wrk is not installed (its Python clients cost ~1 ms of CPU
    per request and compete with the server for the machine's cores).

    Bounded three ways: its own ``max_seconds``, a per-client request cap, and
    ``stop()`` (a line on its stdin, then a kill if it does not exit in time).
    """

    generator = "httpx"

    def __init__(self, url: str, clients: int, max_seconds: float, cap: int) -> None:
        self.args = ["--url", url, "--clients", str(clients), "--max-seconds", str(max_seconds), "--cap", str(cap)]
        self.max_seconds = max_seconds
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait (bounded) until its clients are running."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks._http_flood", *self.args, cwd=_REPO, env=_child_env(),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if line.strip() != b"ready":
            raise RuntimeError(f"flood generator did not start: {line!r}")

    async def stop(self) -> dict[str, Any]:
        """Ask it to stop; return ``{"completions": [monotonic, ...], "errors": n, "requests": n, "generator"}``."""
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            out = await asyncio.wait_for(proc.stdout.read(), self.max_seconds + 30)
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            self.kill()
        import json

        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        result["requests"] = len(result["completions"]) + result["errors"]
        result["generator"] = self.generator
        return result

    def kill(self) -> None:
        """Kill the process if it is still running. Idempotent."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
