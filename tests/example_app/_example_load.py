"""A bounded load generator for a real example app on 127.0.0.1 (the SIGTERM and soak tests).

Threads, each with its own ``httpx.Client``, cycle through a mix of
requests until told to stop, until their request budget is spent, or until
their deadline: every loop is bounded in count and in time. Each request's
outcome is recorded with its start and end (``time.monotonic``), and
:func:`classify` says whether it was the endpoint's normal answer, the
documented 503 refusal (JSON ``error`` code + ``Retry-After``), a transport
error (no answer), or anything else (a contract breach).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import httpx

__all__ = ["Outcome", "Load", "Request", "classify", "DOCUMENTED_503", "standard_mix"]

#: The error codes a draining, stopping or overloaded example app answers 503 with.
DOCUMENTED_503 = frozenset({"gate_closed", "coordinator_stopped", "coordinator_not_running", "overloaded"})


@dataclass(frozen=True)
class Request:
    """One kind of request in a mix, and what its normal answer looks like."""

    name: str
    method: str
    path: Callable[[int, int], str]  # (thread, i) -> path with query
    normal: Callable[[int, Any], bool]  # (status, JSON body) -> is it the endpoint's normal answer
    json: Callable[[int, int], Any] | None = None  # (thread, i) -> body
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    """What one request got."""

    name: str
    thread: int
    started: float
    ended: float
    status: int | None = None
    body: Any = None
    retry_after: str | None = None
    error: str | None = None  # a transport error's class name: the request got no answer


def classify(outcome: Outcome, normal: Callable[[int, Any], bool]) -> str:
    """``"normal"``, ``"refused"`` (the documented 503), ``"no_answer"`` or ``"bad"``."""
    if outcome.error is not None:
        return "no_answer"
    if outcome.status is not None and normal(outcome.status, outcome.body):
        return "normal"
    body = outcome.body if isinstance(outcome.body, dict) else {}
    if outcome.status == 503 and body.get("error") in DOCUMENTED_503 and (outcome.retry_after or "").isdigit():
        return "refused"
    return "bad"


class Load:
    """Run *mix* from *threads* threads against *base* (start(), then stop() and join())."""

    def __init__(self, base: str, mix: Sequence[Request], *, threads: int, max_requests_per_thread: int,
                 max_seconds: float, timeout: float = 30.0) -> None:
        self.base = base
        self.mix = list(mix)
        self.by_name = {r.name: r for r in self.mix}
        self.max_requests = max_requests_per_thread
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.stopping = threading.Event()
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
                         for n in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"load threads still running: {alive}"

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _run(self, n: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        refused_in_a_row = 0
        with httpx.Client(base_url=self.base, timeout=self.timeout) as client:
            for i in range(self.max_requests):
                if self.stopping.is_set() or time.monotonic() >= deadline:
                    return
                request = self.mix[(n + i) % len(self.mix)]
                outcome = Outcome(request.name, n, time.monotonic(), 0.0)
                try:
                    answer = client.request(request.method, request.path(n, i), headers=request.headers,
                                            json=request.json(n, i) if request.json is not None else None)
                    outcome.status = answer.status_code
                    outcome.retry_after = answer.headers.get("retry-after")
                    try:
                        outcome.body = answer.json()
                    except ValueError:
                        outcome.body = answer.text
                    refused_in_a_row = 0
                except httpx.TransportError as exc:
                    outcome.error = type(exc).__name__
                    refused_in_a_row += isinstance(exc, httpx.ConnectError)
                outcome.ended = time.monotonic()
                with self._lock:
                    self.outcomes.append(outcome)
                if refused_in_a_row >= 3:  # the server is gone: nothing more to learn
                    return


def _ok(key: str, value: Any = None) -> Callable[[int, Any], bool]:
    def normal(status: int, body: Any) -> bool:
        return status == 200 and isinstance(body, dict) and key in body and (value is None or body[key] == value)

    return normal


def _processed_or_quarantined(status: int, body: Any) -> bool:
    if not isinstance(body, dict):
        return False
    return (status == 200 and "result" in body) or (status == 409 and body.get("error") == "token_quarantined"
                                                    and bool(body.get("quarantine_id")))


def standard_mix(*, spike_every: int = 0) -> list[Request]:
    """Light, heavy, sticky, ordered, retried and process-lane calls, and batches (a spike every *spike_every*-th).

    A spike (a batch far larger than the warm-up's) is quarantined: 409
    ``token_quarantined`` is its normal answer.
    """

    def batch(n: int, i: int) -> dict[str, list[int]]:
        big = spike_every and i % spike_every == spike_every - 1
        return {"items": list(range(3000)) if big else [n, i, 1, 2]}

    return [
        Request("light", "GET", lambda n, i: "/light?n=2000", _ok("result")),
        Request("heavy", "GET", lambda n, i: "/heavy?ms=20", _ok("slept_ms", 20)),
        Request("sticky", "GET", lambda n, i: f"/sticky/user-{n}-{i % 5}?calls=2", _ok("same_core", True)),
        Request("ordered", "GET", lambda n, i: f"/ordered/acct-{n}?calls=3", _ok("in_order", True)),
        Request("retried", "GET", lambda n, i: "/flaky?fail_times=1", _ok("result")),
        Request("batch", "POST", lambda n, i: "/process", _processed_or_quarantined, json=batch),
        Request("cpu", "GET", lambda n, i: "/cpu?n=20000", _ok("checksum")),  # the process lane
    ]
