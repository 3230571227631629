"""The decorator keeps signatures and return types (ParamSpec), checked with mypy --strict."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

CASES = pathlib.Path(__file__).parent / "typing" / "typing_cases.py"


@pytest.mark.slow
def test_public_api_types_hold_under_mypy_strict() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--warn-unused-ignores", "--no-incremental", str(CASES)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
