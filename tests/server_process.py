"""Test support: run a web server in a child process on a free 127.0.0.1 port, and always stop it.

Shared by the browser tests and the example app's README walkthrough, which
both need a real uvicorn in its own process (the tests then talk to it over
loopback like a user would). Importable from any test module because pytest
puts ``tests/`` on ``sys.path`` (``tests/conftest.py`` has no package around it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import httpx

__all__ = ["RunningServer", "free_port", "python_path_with", "running_server", "server_process"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before {url} answered:\n"
                                   + log.read_text(errors="replace"))
            try:
                if client.get(url).status_code == 200:
                    return
                last_error = "not 200 yet"
            except httpx.TransportError as exc:
                last_error = repr(exc)
            time.sleep(0.1)  # polling another process: there is no event to wait on
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s ({last_error}):\n"
                       + log.read_text(errors="replace"))


@dataclass
class RunningServer:
    """A server started by :func:`running_server`: its base URL, process and log file."""

    base: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """Everything the server printed so far."""
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_server(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path, health_path: str,
                   port: int, startup_timeout: float = 20.0, stop_timeout: float = 10.0) -> Iterator[RunningServer]:
    """Like :func:`server_process`, but yields the :class:`RunningServer`, for tests that signal it themselves."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(proc, base + health_path, log, startup_timeout)
        yield RunningServer(base, proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(stop_timeout)


@contextlib.contextmanager
def server_process(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path, health_path: str,
                   port: int, startup_timeout: float = 20.0, stop_timeout: float = 10.0) -> Iterator[str]:
    """Start *argv* (a server listening on 127.0.0.1:*port*), wait until *health_path* answers 200.

    Yields the base URL. Output goes to *log* (quoted in the error when the
    server dies or never answers). On exit the process is terminated, then
    killed if it has not stopped within *stop_timeout*.
    """
    with running_server(argv, cwd=cwd, env=env, log=log, health_path=health_path, port=port,
                        startup_timeout=startup_timeout, stop_timeout=stop_timeout) as server:
        yield server.base


def python_path_with(root: Path) -> str:
    """``PYTHONPATH`` with *root* first, keeping what the environment already had."""
    return os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
