"""Process-lane functions of the browser test's app (a module of their own: worker processes import it).

Importable as ``_dash_work`` because uvicorn's ``--app-dir tests/browser`` is on
the server's ``sys.path``, which its worker processes start with.
"""

from __future__ import annotations

import os

from tokengate import task_token_guard


@task_token_guard(operation_type="dash_pid", tags={"lane": "process", "weight": "light"})
def worker_pid() -> int:
    """The pid of the worker process that ran the call."""
    return os.getpid()


@task_token_guard(operation_type="dash_crash", tags={"lane": "process", "weight": "light"})
def crash() -> None:
    """End the worker process at once (no cleanup, no exception): only this call fails."""
    os._exit(3)
