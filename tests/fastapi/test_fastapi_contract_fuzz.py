"""The OpenAPI contract holds under fuzzing: schemathesis against a real ``python -m example_app``.

One server (127.0.0.1, a fresh quarantine file) serves the example app and
its admin router with the real policies. ``st run --checks all`` fuzzes
every operation its OpenAPI schema documents, with a bounded number of
examples per operation, in two passes:

1. everything except the routes that stop admission (``/drain``, ``/pause``
   and ``/operations/{op}/pause``): a paused gate would hold every later
   request until its timeout and test nothing;
2. those gate-control routes (with ``/resume`` and the probes), after pass 1.

Zero failures is the contract: every status, body, content type and header
the server sends is documented, malformed input is refused, ``Allow`` lists
every method a path serves. The only server errors accepted are the
documented ones: 503 (tokengate's refusals, with ``Retry-After``) anywhere,
500 ``function_failed`` from ``/fail`` and ``/flaky``, whose function
fails on purpose, and 502 ``worker_crashed`` from ``/crash``, whose function
ends its worker process on purpose (the ``/cpu`` calls around it must still
answer 200: the crash is contained). Long valid sleeps are shortened by
``_contract_fuzz_hooks.py`` to keep the run bounded. The server's output must
hold no traceback.

Slow: about two minutes. Reproduce a failure with the ``curl`` line
schemathesis prints, against ``make run``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import free_port, python_path_with, server_process

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ADMIN_TOKEN = "contract-fuzz-admin-token-0123456789"
MAX_EXAMPLES = 12
SEED = 20261207  # a fixed seed: a failure reproduces run after run
RUN_BUDGET = 300.0  # seconds for one `st run` pass; it ends by itself long before

GATE_CONTROL = r"^/tokengate/(drain|pause|resume|operations/\{operation_type\}/(pause|resume)|health|ready)$"

CONFIG = f"""
hooks = "_contract_fuzz_hooks"
max-stream-events = 2
request-timeout = 60

[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]

[[operations]]
include-path = ["/fail", "/flaky"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "500", "503"]

[[operations]]
include-path = ["/crash"]
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502", "503"]
"""


def _st() -> str:
    st = Path(sys.executable).with_name("st")
    found = str(st) if st.exists() else shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed: it is in the dev extra (pip install -e '.[fastapi,dev]')")
    return found


def _run_schemathesis(base: str, tmp_path: Path, name: str, *filters: str) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    argv = [
        _st(), "--config-file", str(config), "--no-color", "run", f"{base}/openapi.json",
        "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
        "--generation-database", "none", "--header", f"Authorization: Bearer {ADMIN_TOKEN}",
        "--report-dir", str(tmp_path / f"report-{name}"), *filters,
    ]
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": python_path_with(HERE),
           "HOME": str(tmp_path), "SCHEMATHESIS_TELEMETRY": "false"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_BUDGET)
    output = done.stdout + done.stderr
    (tmp_path / f"schemathesis-{name}.txt").write_text(output)
    assert done.returncode == 0, f"schemathesis pass {name!r} found contract failures:\n{output[-20000:]}"
    assert "No operations" not in output and " 0 generated" not in output, output[-5000:]


@pytest.mark.slow
@pytest.mark.timeout(2 * RUN_BUDGET + 60)
def test_example_app_and_admin_router_keep_their_openapi_contract_under_fuzzing(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    argv = [sys.executable, "-m", "example_app", "--port", str(port), "--log-level", "warning",
            "--quarantine-db", str(tmp_path / "quarantine.sqlite3")]
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": python_path_with(REPO),
           "TOKENGATE_ADMIN_TOKEN": ADMIN_TOKEN}
    with server_process(argv, cwd=tmp_path, env=env, log=log, health_path="/tokengate/health",
                        port=port) as base:
        _run_schemathesis(base, tmp_path, "app-and-admin", "--exclude-path-regex", GATE_CONTROL)
        _run_schemathesis(base, tmp_path, "gate-control", "--include-path-regex", GATE_CONTROL)
    server_output = log.read_text(errors="replace")
    assert "Traceback" not in server_output, server_output[-20000:]
