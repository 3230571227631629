"""Helpers shared by the state-machine and fault-injection tests: settle recording and leftover checks.

* :class:`SettleRecorder` is a policy that counts ``on_settle`` per token, so a
  test can assert that every token settled exactly once (a hook that raised
  would be swallowed by the coordinator, so it records violations instead of
  asserting).
* :func:`leftovers` reads the coordinator's and the policies' public
  statistics and names every resource still held (pins, tier slots, held
  calls, pending calls...), so "nothing remains after settlement" is one
  assertion.
* :func:`on_loop` runs a function on the coordinator's loop thread and waits
  (bounded) for its result: statistics read there are a consistent snapshot,
  because settlement happens on that thread.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import threading
import time
from typing import Any, Callable, TypeVar

from tokengate import OperationsCoordinator, Policy, TaskToken, TokenState

T = TypeVar("T")

#: The bound on every wait in these tests: a lost call fails the test instead of hanging it.
WAIT = 10.0

TERMINAL = frozenset({TokenState.COMPLETED, TokenState.FAILED, TokenState.KILLED, TokenState.TIMEOUT,
                      TokenState.REJECTED, TokenState.QUARANTINED})


class SettleRecorder(Policy):
    """Counts ``on_settle`` per token id; records double settles and settles of non-terminal tokens."""

    name = "settle_recorder"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.states: dict[str, TokenState] = {}
        self.violations: list[str] = []

    def on_settle(self, token: TaskToken[Any]) -> None:
        state = token.state
        with self._lock:
            tid = token.token_id
            n = self.counts.get(tid, 0) + 1
            self.counts[tid] = n
            self.states[tid] = state
            if n > 1:
                self.violations.append(f"token {tid} ({token.operation_type}) settled {n} times")
            if state not in TERMINAL:
                self.violations.append(f"token {tid} ({token.operation_type}) settled in state {state.name}")

    def settled(self, token_id: str) -> bool:
        with self._lock:
            return token_id in self.counts

    def total(self) -> int:
        """How many distinct tokens settled."""
        with self._lock:
            return len(self.counts)

    def by_state(self) -> dict[TokenState, int]:
        with self._lock:
            out: dict[TokenState, int] = {}
            for state in self.states.values():
                out[state] = out.get(state, 0) + 1
            return out


def on_loop(coordinator: OperationsCoordinator, fn: Callable[[], T], *, context: contextvars.Context | None = None,
            timeout: float = WAIT) -> T:
    """Run *fn* on the coordinator's loop thread (in *context*, if given) and return its result or raise its error."""
    loop = coordinator.loop
    assert loop is not None, "the coordinator has no loop (not started?)"
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()

    def call() -> None:
        try:
            fut.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(exc)

    loop.call_soon_threadsafe(call, context=context)
    return fut.result(timeout)


def leftovers(stats: dict[str, Any]) -> dict[str, Any]:
    """Every resource a coordinator snapshot (``coordinator.stats()``) still shows as held; {} when none is.

    Checked: in-flight, waiting and admitted calls, pending queues, calls held by
    a per-operation pause, sticky pins (and calls waiting for a pin or in an
    ordered queue), storage-tier slots and tier FIFOs, conductor domains, and
    quarantine releases in flight. Executing workers are not checked: a
    function that outlived its timeout or a stop keeps its thread by design.
    """
    out: dict[str, Any] = {}
    counts = stats["counts"]
    for key in ("inflight", "waiting", "admitted"):
        if counts[key]:
            out[key] = counts[key]
    if stats["pending_total"]:
        out["pending_total"] = stats["pending_total"]
    held = {op: n for op, n in stats["held"].items() if n}
    if held:
        out["held"] = held
    policies = stats["policies"]
    sticky = policies.get("sticky")
    if sticky is not None:
        for key in ("pins", "inflight", "waiting_for_pin", "waiting_in_order"):
            if sticky[key]:
                out[f"sticky.{key}"] = sticky[key]
    tiers = policies.get("storage_tiers")
    if tiers is not None:
        for tier, row in tiers["tiers"].items():
            for key in ("active", "waiting"):
                if row[key]:
                    out[f"storage_tiers.{tier}.{key}"] = row[key]
    conductor = policies.get("conductor")
    if conductor is not None:
        for key in ("domains", "pending"):
            if conductor[key]:
                out[f"conductor.{key}"] = conductor[key]
    quarantine = policies.get("quarantine")
    if quarantine is not None and quarantine.get("releases_in_flight"):
        out["quarantine.releases_in_flight"] = quarantine["releases_in_flight"]
    return out


def coordinator_threads(coordinator: OperationsCoordinator) -> list[threading.Thread]:
    """The live threads a coordinator created (its workers, and its loop thread in standalone mode)."""
    prefix = coordinator.name + "-"
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def wait_threads_gone(coordinator: OperationsCoordinator, timeout: float = WAIT) -> list[str]:
    """Wait (bounded) for the coordinator's threads to exit; return the names of those still alive."""
    deadline = time.monotonic() + timeout
    for thread in coordinator_threads(coordinator):
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(t.name for t in coordinator_threads(coordinator))
