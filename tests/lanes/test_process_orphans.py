"""A worker process does not outlive its parent for long, even in the middle of a call.

The parent is killed outright (SIGKILL: no stop(), no atexit, no cleanup), as an
OOM kill or a crashed server would be. Without the child's watchdog its worker
process would go on computing a result nobody reads until the call returned.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from .test_process_lane import _gone, _wait_for_file

ROOT = Path(__file__).resolve().parents[2]

# A server stand-in: a coordinator with worker processes, one call running in one of them
# (it waits up to 120 s for a file that never comes), then nothing until it is killed.
_PARENT = """
import sys, time
from tokengate import OperationsCoordinator
from tests.lanes import lane_functions as lf
coordinator = OperationsCoordinator(policies=[], process_workers=2, warm_processes=True, name="orphans")
coordinator.start()
token = lf.hold(sys.argv[1], sys.argv[2], 120.0)
time.sleep(120)
"""


def test_a_worker_process_ends_soon_after_its_parent_is_killed_mid_call(tmp_path: Path) -> None:
    marker, go = tmp_path / "marker", tmp_path / "never"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(marker), str(go)], cwd=ROOT)
    child_pid = None
    try:
        # Given a call running in a worker process of the parent
        child_pid = _wait_for_file(marker, timeout=60.0)
        assert psutil.Process(child_pid).is_running()
        # When the parent is killed outright
        parent.kill()
        parent.wait(10)
        # Then the worker process ends within seconds, not when its call would have returned (120 s)
        assert _gone(child_pid, timeout=15.0), f"worker process {child_pid} outlived its killed parent"
    finally:
        parent.kill()
        parent.wait(10)
        if child_pid is not None and not _gone(child_pid, timeout=0.1):
            psutil.Process(child_pid).kill()  # leave no orphan behind, whatever the outcome
