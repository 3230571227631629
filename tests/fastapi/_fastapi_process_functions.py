"""Decorated process-lane functions for test_fastapi_process_lane.py (importable by worker processes).

A worker process imports this module by name (``_fastapi_process_functions``):
``tests/fastapi`` is on the parent's ``sys.path`` under pytest, and worker
processes start with the parent's ``sys.path``.
"""

from __future__ import annotations

import os
import time

from tokengate import task_token_guard


@task_token_guard(operation_type="fxp.pid", tags={"lane": "process", "weight": "light"})
def worker_pid() -> int:
    """The pid of the worker process that ran the call."""
    return os.getpid()


@task_token_guard(operation_type="fxp.crash", tags={"lane": "process", "weight": "light"})
def crash(code: int) -> None:
    """End the worker process at once, as a segfault or the OOM killer would (no cleanup, no exception)."""
    os._exit(code)


@task_token_guard(operation_type="fxp.block", tags={"lane": "process", "weight": "light"})
def block(path: str, seconds: float = 60.0) -> str:
    """Write this process's pid to *path*, then sleep (until killed, in the tests)."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "finished"
