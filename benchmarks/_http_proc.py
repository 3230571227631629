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

__all__ = ["Server", "free_port"]

_REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python -m benchmarks._http_server --kind <kind>`` on a free port; its stderr goes to a log file."""

    def __init__(self, kind: str, cfg: dict[str, Any], out: Path) -> None:
        self.kind = kind
        self.cfg = cfg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = out / f"http-server-{kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "benchmarks._http_server", "--kind", self.kind, "--port", str(self.port),
               "--num-cores", str(self.cfg["num_cores"]), "--workers-per-core", str(self.cfg["workers_per_core"]),
               "--heavy-ms", str(self.cfg["heavy_ms"]), "--lifespan", self.cfg.get("lifespan", "auto")]
        self.proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
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
