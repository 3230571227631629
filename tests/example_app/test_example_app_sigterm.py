"""SIGTERM under load: a real ``python -m example_app`` answers every request it accepted, then exits.

The server runs with a short drain (``--drain-timeout 2``). A bounded mixed
load (light, heavy, sticky, ordered, retried, batches, process-lane ``/cpu``)
runs from threads on 127.0.0.1, two long calls are in flight (one finishes
inside the drain, one outlives it), and quarantine records exist. Then
SIGTERM. Required:

* every request that got a response got its normal answer or the documented
  503 JSON (``gate_closed`` during the drain, ``coordinator_stopped`` for the
  call that outlived it) with ``Retry-After``; every request sent before the
  signal got a response; new requests were refused with 503 while draining;
* the process exits within its budget (drain + graceful timeout + slack);
* its output holds no traceback and no cancelled task;
* no worker process of the process lane outlives it;
* after a restart on the same database, the quarantine records written
  before the signal are intact.

Slow: about 20 s. This directory has no ``__init__.py`` on purpose.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from _example_load import Load, Outcome, classify, standard_mix
from server_process import RunningServer, free_port, python_path_with, running_server

REPO = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "sigterm-test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DRAIN_TIMEOUT = 2.0
GRACEFUL_TIMEOUT = 2  # uvicorn --timeout-graceful-shutdown: not shorter than the drain
# stop() abandons running threads after 0.5 s; /events streams and uvicorn notice within ~1 s each.
EXIT_BUDGET = DRAIN_TIMEOUT + GRACEFUL_TIMEOUT + 8.0
SHORT_CALL = 0.6  # seconds: finishes inside the drain
LONG_CALL = DRAIN_TIMEOUT + 6.0  # outlives the drain: its request answers 503 coordinator_stopped


def _argv(port: int, db: Path) -> list[str]:
    return [sys.executable, "-m", "example_app", "--port", str(port), "--log-level", "info",
            "--quarantine-db", str(db), "--drain-timeout", str(DRAIN_TIMEOUT),
            "--timeout-graceful-shutdown", str(GRACEFUL_TIMEOUT)]


def _env() -> dict[str, str]:
    return {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": python_path_with(REPO),
            "TOKENGATE_ADMIN_TOKEN": ADMIN_TOKEN}


def _quarantine_two_spikes(client: httpx.Client) -> list[dict[str, Any]]:
    for i in range(5):  # the warm-up that teaches the quarantine the usual batch size
        assert client.post("/process", json={"items": [i, 1, 2]}).status_code == 200
    ids = []
    for _ in range(2):
        spike = client.post("/process", json={"items": list(range(4000))})
        assert spike.status_code == 409 and spike.json()["error"] == "token_quarantined", spike.text
        ids.append(spike.json()["quarantine_id"])
    return [client.get(f"/tokengate/quarantine/{qid}", headers=AUTH).json() for qid in ids]


def _wait_until(what: str, check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling another process: there is no event to wait on


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _slow_running(client: httpx.Client) -> int:
    workers = client.get("/tokengate/workers", headers=AUTH).json()
    return sum(1 for w in workers if w.get("running_operation") == "example.slow")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_under_load_answers_every_accepted_request_and_exits_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "quarantine.sqlite3"
    port = free_port()
    server: RunningServer
    long_calls: dict[str, Outcome] = {}

    def long_call(name: str, seconds: float) -> None:
        outcome = Outcome(name, -1, time.monotonic(), 0.0)
        try:
            with httpx.Client(timeout=30) as client:
                answer = client.get(f"{server.base}/slow", params={"seconds": seconds})
            outcome.status, outcome.retry_after = answer.status_code, answer.headers.get("retry-after")
            try:
                outcome.body = answer.json()
            except ValueError:  # not JSON: a contract breach, reported by the assertions below
                outcome.body = answer.text
        except httpx.TransportError as exc:
            outcome.error = type(exc).__name__
        outcome.ended = time.monotonic()
        long_calls[name] = outcome

    with running_server(_argv(port, db), cwd=tmp_path, env=_env(), log=tmp_path / "server.log",
                        health_path="/tokengate/health", port=port) as server:
        with httpx.Client(base_url=server.base, timeout=10) as client:
            records_before = _quarantine_two_spikes(client)
            # Given: a mixed load flowing, and two long calls running
            load = Load(server.base, standard_mix(), threads=4, max_requests_per_thread=2000, max_seconds=60)
            load.start()
            callers = [threading.Thread(target=long_call, args=("short", SHORT_CALL)),
                       threading.Thread(target=long_call, args=("long", LONG_CALL))]
            for caller in callers:
                caller.start()
            _wait_until("both long calls to run", lambda: _slow_running(client) == 2)
            _wait_until("the load to flow", lambda: load.count() >= 40)
            worker_pids = [w["process"]["pid"] for w in client.get("/tokengate/workers", headers=AUTH).json()
                           if w["lane"] == "process" and w["process"]["pid"] is not None]
        # When: SIGTERM arrives mid-run
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Then: the process exits within its budget
        try:
            returncode = server.proc.wait(EXIT_BUDGET)
        except Exception:
            pytest.fail(f"the server did not exit within {EXIT_BUDGET} s of SIGTERM:\n{server.output()[-5000:]}")
        exited = time.monotonic()
        load.stop()
        load.join(35)
        for caller in callers:
            caller.join(35)
        output = server.output()

    assert returncode in (-signal.SIGTERM, 0), (returncode, output[-3000:])
    assert "Traceback" not in output and "timeout graceful shutdown exceeded" not in output, output[-20000:]
    assert "draining for up to" in output  # the drain-first shutdown ran

    # every answer is the normal one or the documented 503; everything sent before the signal was answered
    verdicts: Counter[str] = Counter()
    after_signal: Counter[str] = Counter()
    bad = []
    for outcome in load.snapshot():
        verdict = classify(outcome, load.by_name[outcome.name].normal)
        verdicts[verdict] += 1
        if outcome.started >= signalled:
            after_signal[verdict if verdict != "refused" else str(outcome.body.get("error"))] += 1
        if verdict == "bad" or (verdict == "no_answer" and outcome.started < signalled):
            bad.append(outcome)
    assert not bad, f"{len(bad)} requests broke the contract, e.g. {bad[:5]}; all: {verdicts}"
    assert verdicts["normal"] >= 40, verdicts
    assert after_signal["gate_closed"] >= 1, f"no request was refused with 503 while draining: {after_signal}"
    # the call that finished inside the drain got its answer; the one that outlived it the 503
    short, long = long_calls["short"], long_calls["long"]
    assert short.status == 200 and short.body == {**short.body, "slept_s": SHORT_CALL}, short
    assert long.status == 503 and isinstance(long.body, dict) and long.body.get("error") == "coordinator_stopped" \
        and long.retry_after, long
    assert short.ended < exited and long.ended - signalled < EXIT_BUDGET
    # no worker process of the process lane outlives the server
    assert worker_pids and verdicts["normal"] and any(o.name == "cpu" and o.status == 200 for o in load.snapshot())
    _wait_until("the worker processes to end", lambda: not [p for p in worker_pids if _alive(p)], timeout=10)
    print(f"\nSIGTERM test: exit {exited - signalled:.2f} s after the signal (budget {EXIT_BUDGET:.0f} s); "
          f"answers {dict(verdicts)}; after the signal {dict(after_signal)}")

    # After a restart on the same database, the records written before the signal are intact
    port = free_port()
    with running_server(_argv(port, db), cwd=tmp_path, env=_env(), log=tmp_path / "server2.log",
                        health_path="/tokengate/health", port=port) as again:
        with httpx.Client(base_url=again.base, timeout=10) as client:
            for before in records_before:
                after = client.get(f"/tokengate/quarantine/{before['id']}", headers=AUTH)
                assert after.status_code == 200, after.text
                assert after.json() == before
