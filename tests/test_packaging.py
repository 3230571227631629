"""The wheel holds the two libraries and nothing else at top level (slow: builds a wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_only_tokengate_and_tokengate_fastapi(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves a build/ folder beside the sources it builds.
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("tokengate", "tokengate_fastapi", "example_app", "benchmarks"):
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(source)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = list(tmp_path.glob("tokengate-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"tokengate", "tokengate_fastapi"}, top
    for needed in ("tokengate/py.typed", "tokengate_fastapi/py.typed", "tokengate/lanes/_child.py",
                   "tokengate/lanes/process_worker.py", "tokengate/policies/sticky.py", "tokengate/quarantine/writer.py",
                   "tokengate_fastapi/static/dashboard.html"):
        assert needed in names, needed
