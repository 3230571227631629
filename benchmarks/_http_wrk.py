"""wrk as the http benchmark's flood generator, and the parsing of wrk's summary.

wrk (Debian's ``wrk``, installed by ``make bench``) is a native load generator:
a few µs of CPU per request, so 100 connections flooding a server measure the
server, not the client. (Python load generators saturate a core of their own
first and, on a 2-CPU machine, hide the server's tail under the flood.)

Thread: the benchmark's event-loop thread (asyncio subprocesses).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
from typing import Any

__all__ = ["WrkFlood", "parse_wrk", "find_wrk"]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def find_wrk() -> str | None:
    """The path of ``wrk`` on PATH, or None."""
    return shutil.which("wrk")


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, errors and the latency distribution (ms) from wrk's summary (``--latency`` output).

    Missing lines give zeros / absent keys, never an exception: a wrk that was
    killed prints nothing, and the caller reports that as no requests.
    """
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    requests = int(total.group(1)) if total else 0
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    out: dict[str, Any] = {"requests": requests, "errors": errors,
                           "elapsed_s": _ms(total.group(2), total.group(3)) / 1e3 if total else 0.0}
    dist = re.search(r"Latency Distribution\s*\n((?:\s+\d+%\s+[\d.]+(?:us|ms|s|m)\s*\n)+)", text)
    if dist:
        for pct, value, unit in re.findall(r"(\d+)%\s+([\d.]+)(us|ms|s|m)", dist.group(1)):
            out[f"p{pct}_ms"] = _ms(value, unit)
    return out


class WrkFlood:
    """``wrk -t T -c C -d D --latency URL`` as an asyncio subprocess; ``stop()`` ends it with SIGINT.

    wrk answers SIGINT by stopping its connections and printing its summary, so
    the flood can last exactly as long as the measurement needs. Bounded three
    ways: wrk's own ``-d`` (*max_seconds*), ``stop()``, and ``kill()`` (always
    called by ``stop()``'s ``finally``). *timeout_s* is wrk's per-request
    timeout (a request slower than that counts as an error, not as a latency).
    """

    generator = "wrk"

    def __init__(self, wrk: str, url: str, *, connections: int, threads: int, max_seconds: float,
                 timeout_s: float = 10.0) -> None:
        if connections < threads or threads < 1:
            raise ValueError(f"wrk needs connections >= threads >= 1, got {connections} and {threads}")
        self.args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, int(max_seconds + 0.999))}s",
                     f"--timeout={max(1, int(timeout_s))}s", "--latency", url]
        self.max_seconds = max_seconds
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start wrk (it connects at once; the caller waits its own warm-up)."""
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdin=asyncio.subprocess.DEVNULL,
                                                         stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.STDOUT)

    async def stop(self) -> dict[str, Any]:
        """SIGINT, then read wrk's summary (bounded); returns ``parse_wrk``'s dict plus the raw text."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        try:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
            out = await asyncio.wait_for(proc.stdout.read(), self.max_seconds + 30)
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            self.kill()
        text = out.decode(errors="replace")
        return {**parse_wrk(text), "generator": self.generator, "raw": text}

    def kill(self) -> None:
        """Kill wrk if it is still running. Idempotent."""
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
