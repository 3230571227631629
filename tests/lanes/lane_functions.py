"""Decorated process-lane functions for tests/lanes/test_process_lane.py (importable by worker processes)."""

from __future__ import annotations

import os
import signal
import time

from tokengate import task_token_guard


@task_token_guard(operation_type="lane.square", tags={"lane": "process", "weight": "heavy"})
def square(x: int) -> int:
    return x * x


@task_token_guard(operation_type="lane.pid", tags={"process_pool": True, "weight": "light"})
def worker_pid() -> int:
    return os.getpid()


@task_token_guard(operation_type="lane.fail", tags={"lane": "process", "weight": "light"})
def fail(message: str) -> None:
    raise ValueError(message)


@task_token_guard(operation_type="lane.die", tags={"lane": "process", "weight": "light"})
def die(how: str) -> None:
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


@task_token_guard(operation_type="lane.block", tags={"lane": "process", "weight": "light"})
def block(path: str, seconds: float = 60.0) -> str:
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "finished"


# The timeout leaves a replacement process (after another test's kill) time to start on a loaded machine.
@task_token_guard(operation_type="lane.block_timeout", tags={"lane": "process", "weight": "light", "timeout": 4.0})
def block_with_timeout(path: str, seconds: float = 60.0) -> str:
    return block.__wrapped__(path, seconds)  # type: ignore[no-any-return]


@task_token_guard(operation_type="lane.spin", tags={"lane": "process", "weight": "heavy"})
def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


@task_token_guard(operation_type="lane.spin_thread", tags={"weight": "heavy"})
def spin_thread(n: int) -> int:
    return spin.__wrapped__(n)  # type: ignore[no-any-return]


@task_token_guard(operation_type="lane.hold", tags={"lane": "process", "weight": "light"})
def hold(marker: str, go: str, seconds: float = 30.0) -> int:
    """Write this process's pid to *marker*, then wait (at most *seconds*) until the file *go* exists."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    return os.getpid()


@task_token_guard(operation_type="lane.record", tags={"lane": "process", "weight": "light"})
def record(log: str, i: int, die: bool = False) -> int:
    """Append ``"<i> <pid>"`` to *log* (every run leaves a line), then return the pid, or end the process."""
    with open(log, "a") as f:
        f.write(f"{i} {os.getpid()}\n")
    if die:
        os._exit(3)
    return os.getpid()


@task_token_guard(operation_type="lane.record_timeout", tags={"lane": "process", "weight": "light", "timeout": 0.5})
def record_with_timeout(log: str, i: int) -> int:
    return record.__wrapped__(log, i)  # type: ignore[no-any-return]


@task_token_guard(operation_type="lane.type_name", tags={"lane": "process", "weight": "light"})
def type_name(value: object) -> str:
    return type(value).__name__


# Heavy twins for the pull across domains: on two domains heavy calls may use both domains' processes.
@task_token_guard(operation_type="lane.hold_heavy", tags={"lane": "process", "weight": "heavy"})
def hold_heavy(marker: str, go: str, seconds: float = 30.0) -> int:
    return hold.__wrapped__(marker, go, seconds)  # type: ignore[no-any-return]


@task_token_guard(operation_type="lane.pid_heavy", tags={"lane": "process", "weight": "heavy"})
def pid_heavy(i: int) -> int:
    return os.getpid()


@task_token_guard(operation_type="lane.sticky_pid", tags={"lane": "process", "weight": "heavy", "sticky_key": "user"})
def sticky_pid(user: int, i: int) -> int:
    return os.getpid()
