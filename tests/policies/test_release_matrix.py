"""Every resource a policy holds for a call is released in every terminal state the call can reach.

Resources: a sticky pin, an ordered key's running call and a call queued behind
it (with a key of all the arguments, and with a ``sticky_key`` chosen from
them), a conductor domain, a storage-tier slot and a place in a tier's FIFO, and a
call held by a per-operation pause. Terminal states: COMPLETED, FAILED, KILLED
(by an operator, and by a stop), TIMEOUT, REJECTED (by a later policy at
submission and at admission) and QUARANTINED (an operation on hold).

Each case checks, besides the final count, that the resource really was held
when the call left (a probe policy reads it at the refusal, or the test reads
it before the kill or the timeout), that a kill or a timeout frees it at once
(while the blocker still runs: not lazily, when someone next looks), and, for
resources other calls wait for (an ordered key, a tier slot), that a later call
still gets it. A skipped release fails the matching cases: each policy's
``on_settle`` (and the tiers' ``after_run``) was made to skip one terminal state
at a time, and the router's removal of a killed or timed-out paused call, and
every such mutant failed exactly the cases of that resource and state.

Timeouts use a virtual clock (tests/virtual_time.py): a call times out when the
test advances the clock, never because a worker was slow to start it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from virtual_time import NEVER, expire, start_virtual

from tokengate import (
    OperationsCoordinator,
    Policy,
    Rejected,
    TaskToken,
    TokenKilled,
    TokenQuarantined,
    TokenState,
    TokenTimeout,
    task_token_guard,
)
from tokengate.policies.conductor import ConductorPolicy
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.policies.sticky import StickyPolicy
from tokengate.policies.tiers import StorageTierPolicy

from .test_sticky import Recorder

WAIT = 10.0


class Boom(Exception):
    pass


class _Events:
    """Per-test events the functions below wait on (reset by the fixture)."""

    def __init__(self) -> None:
        self.entered = threading.Event()  # the subject started running
        self.gate = threading.Event()  # lets the subject return
        self.blocker_entered = threading.Event()
        self.blocker_gate = threading.Event()


EV = _Events()


def _behave(mode: str) -> str:
    """``gate``: wait until the test opens the gate; ``fail``: raise Boom (after the gate, if both)."""
    if "gate" in mode:
        EV.entered.set()
        assert EV.gate.wait(WAIT), "the test never opened the gate"
    if "fail" in mode:
        raise Boom("failed on purpose")
    return mode


def _block(mode: str) -> str:
    EV.blocker_entered.set()
    assert EV.blocker_gate.wait(WAIT), "the test never opened the blocker's gate"
    return mode


# Subjects carry a timeout no test reaches in real time (expire() fires it); blockers none.
_HEAVY = {"weight": "heavy"}


@task_token_guard(operation_type="rel.pin", tags={**_HEAVY, "sticky_anchor": "rel-pin", "hash_policy": "none",
                                                 "timeout": NEVER})
def pin_call(mode: str) -> str:
    return _behave(mode)


_ORDERED = {**_HEAVY, "sticky_anchor": "rel-ordered", "ordered": True, "hash_policy": "none"}


@task_token_guard(operation_type="rel.ordered", tags={**_ORDERED, "timeout": NEVER})
def ordered_call(mode: str) -> str:
    return _behave(mode)


@task_token_guard(operation_type="rel.ordered_blocker", tags=_ORDERED)
def ordered_blocker(mode: str) -> str:
    return _block(mode)


# An ordered key chosen from the arguments: the mode differs on every call, the account (a default) does not.
_KEYED = {**_HEAVY, "sticky_anchor": "rel-keyed", "sticky_key": "account", "ordered": True}


@task_token_guard(operation_type="rel.keyed", tags={**_KEYED, "timeout": NEVER})
def keyed_call(mode: str, account: str = "acme") -> str:
    return _behave(mode)


@task_token_guard(operation_type="rel.keyed_blocker", tags=_KEYED)
def keyed_blocker(mode: str, account: str = "acme") -> str:
    return _block(mode)


@task_token_guard(operation_type="rel.lead", tags={**_HEAVY, "external_calls": ["rel.child"], "timeout": NEVER})
def lead_call(mode: str) -> str:
    return _behave(mode)


@task_token_guard(operation_type="rel.tier", tags={**_HEAVY, "storage_speed": "slow", "timeout": NEVER})
def tier_call(mode: str) -> str:
    return _behave(mode)


@task_token_guard(operation_type="rel.tier_blocker", tags={**_HEAVY, "storage_speed": "slow"})
def tier_blocker(mode: str) -> str:
    return _block(mode)


@task_token_guard(operation_type="rel.paused", tags={**_HEAVY, "timeout": NEVER})
def paused_call(mode: str) -> str:
    return _behave(mode)


# -- the resources ------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    name: str
    subject: Callable[[str], TaskToken[str]]
    #: A call that must be running (or holding the resource) before the subject is submitted.
    blocker: Callable[[str], TaskToken[str]] | None
    #: How much of the resource is in use now (must be > 0 while the subject holds or waits for it).
    used: Callable[[OperationsCoordinator], int]
    #: A later call that needs the resource (None: nobody waits for it).
    follow: Callable[[str], TaskToken[str]] | None
    pause_op: str | None = None  # paused before the subject is submitted


def _policy(c: OperationsCoordinator, name: str) -> Any:
    policy = c.policy(name)
    assert policy is not None
    return policy


def _pins(c: OperationsCoordinator) -> int:
    s = _policy(c, "sticky").stats()
    return int(s["pins"] + s["inflight"] + s["waiting_for_pin"] + s["waiting_in_order"])


def _domains(c: OperationsCoordinator) -> int:
    s = _policy(c, "conductor").stats()
    return int(s["domains"] + s["pending"])


def _slots(c: OperationsCoordinator) -> int:
    slow = _policy(c, "storage_tiers").stats()["tiers"]["slow"]
    return int(slow["active"] + slow["waiting"])


def _held(c: OperationsCoordinator) -> int:
    return int(c.stats()["held"].get("rel.paused", 0))


RESOURCES = {
    r.name: r
    for r in [
        Resource("pin", pin_call, None, _pins, pin_call),
        Resource("ordered_running", ordered_call, None, _pins, ordered_call),
        Resource("ordered_queued", ordered_call, ordered_blocker, _pins, ordered_call),
        Resource("keyed_running", keyed_call, None, _pins, keyed_call),
        Resource("keyed_queued", keyed_call, keyed_blocker, _pins, keyed_call),
        Resource("domain", lead_call, None, _domains, None),
        Resource("tier_slot", tier_call, None, _slots, tier_call),
        Resource("tier_fifo", tier_call, tier_blocker, _slots, tier_call),
        Resource("paused", paused_call, None, _held, None, pause_op="rel.paused"),
    ]
}


class Gatekeeper(Policy):
    """Refuses subject calls whose mode asks for it, after reading how much of the resource is in use."""

    name = "gatekeeper"

    def __init__(self) -> None:
        self.used: Callable[[], int] | None = None
        self.seen: list[tuple[str, int]] = []

    def _check(self, token: TaskToken[Any], hook: str) -> None:
        args = token.args or ()
        if args and args[0] == f"refuse_{hook}" and self.used is not None:
            self.seen.append((hook, self.used()))
            raise Rejected(f"refused at {hook} by the test", operation_type=token.operation_type)
        if args and args[0] == "quarantine" and hook == "submit" and self.used is not None:
            self.seen.append(("quarantine", self.used()))  # the quarantine policy refuses it next

    def before_submit(self, token: TaskToken[Any]) -> None:
        self._check(token, "submit")

    def admit(self, token: TaskToken[Any]) -> bool:
        self._check(token, "admit")
        return True


@pytest.fixture(autouse=True)
def _fresh_events() -> Any:
    global EV
    EV = _Events()
    yield
    EV.gate.set()
    EV.blocker_gate.set()


def _start() -> tuple[OperationsCoordinator, Recorder, Gatekeeper, QuarantinePolicy]:
    recorder, gatekeeper, quarantine = Recorder(), Gatekeeper(), QuarantinePolicy(":memory:")
    # Tiers last among the holders (as default_policies() does); the gatekeeper and the
    # quarantine come after every policy that takes a resource, so they refuse calls holding one.
    # (storage_tiers logs a warning about the gatekeeper's admit hook: on purpose, it refuses, never holds.)
    policies: list[Policy] = [recorder, StickyPolicy(), ConductorPolicy(), StorageTierPolicy(limits={"slow": 1}),
                              gatekeeper, quarantine]
    c = OperationsCoordinator(num_cores=1, workers_per_core=2, bulkhead_reserve=0, stop_timeout=WAIT,
                              policies=policies)
    return start_virtual(c), recorder, gatekeeper, quarantine


def _retrieve(token: TaskToken[Any]) -> BaseException | None:
    try:
        token.get(WAIT)
    except BaseException as exc:  # noqa: BLE001 - inspected by the caller
        if token.done() and not token.cancelled():
            token.exception()  # mark it retrieved (get() does not)
        return exc
    return None


# -- the terminal states -----------------------------------------------------------------

STATES = ["completed", "failed", "killed", "stopped", "timeout", "rejected_submit", "rejected_admit", "quarantined"]

# Not reachable: a tier slot is taken at admission, after the quarantine's only check (submission);
# a pause holds a call at routing, after every refusal.
UNREACHABLE = {
    ("tier_slot", "quarantined"), ("tier_fifo", "quarantined"), ("tier_slot", "rejected_submit"),
    ("tier_fifo", "rejected_submit"),
    ("paused", "rejected_submit"), ("paused", "rejected_admit"), ("paused", "quarantined"),
    ("paused", "stopped"),  # a stop lifts the pause first (graceful), so the call runs
}

CASES = [(r, s) for r in RESOURCES for s in STATES if (r, s) not in UNREACHABLE]


@pytest.mark.parametrize(("resource_name", "state"), CASES, ids=[f"{r}-{s}" for r, s in CASES])
def test_the_resource_is_released_in_every_terminal_state(resource_name: str, state: str) -> None:
    resource = RESOURCES[resource_name]
    c, recorder, gatekeeper, quarantine = _start()
    gatekeeper.used = lambda: resource.used(c)
    blocker: TaskToken[str] | None = None
    waits = resource.blocker is not None or resource.pause_op is not None  # the subject cannot start yet
    try:
        # Given the resource in use by a blocker the subject must wait behind, or a pause
        if resource.blocker is not None:
            blocker = resource.blocker("blocker")
            assert EV.blocker_entered.wait(WAIT)
        if resource.pause_op is not None:
            c.pause(resource.pause_op)
        if state in ("killed", "stopped") and not waits:
            c.pause()  # the subject takes its resource, then waits in a pending queue
        if state == "quarantined":
            quarantine.hold(resource.subject.operation_type)  # type: ignore[attr-defined]
        before = resource.used(c)

        # When the subject reaches the terminal state
        mode = {"completed": "gate", "failed": "gate_fail", "rejected_submit": "refuse_submit",
                "rejected_admit": "refuse_admit", "quarantined": "quarantine"}.get(state, "gate")
        token: TaskToken[str] | None = None
        try:
            token = resource.subject(mode)
        except (Rejected, TokenQuarantined) as exc:  # refused while it was being submitted
            expected = TokenState.QUARANTINED if isinstance(exc, TokenQuarantined) else TokenState.REJECTED
            assert state in ("rejected_submit", "rejected_admit", "quarantined"), exc
        else:
            assert resource.used(c) > before, "the subject holds nothing"
            expected = _drive(c, token, state, resource, blocker)
            assert token.state is expected, (token.state, expected)
            if state in ("killed", "timeout"):
                # Released when it settled, not lazily later (say, when the blocker's slot frees):
                # the blocker still runs, and the subject's share is already gone.
                assert resource.used(c) == before, f"{resource_name} not released at {expected.name}"
        if state.startswith("rejected") or state == "quarantined":
            assert expected is (TokenState.QUARANTINED if state == "quarantined" else TokenState.REJECTED)
            # The probe ran just before the refusal: the subject held its share then.
            assert gatekeeper.seen, "the refusing policy never saw the subject"
            held_then = gatekeeper.seen[0][1]
            assert held_then > (0 if state == "rejected_admit" else before), "the subject held nothing when refused"
        if state == "quarantined":
            quarantine.unhold(resource.subject.operation_type)  # type: ignore[attr-defined]

        # Then the resource is free once the blocker, if any, finished too
        EV.blocker_gate.set()
        EV.gate.set()
        if blocker is not None:
            outcome = _retrieve(blocker)
            assert outcome is None or (state == "stopped" and isinstance(outcome, TokenKilled)), outcome
        if state != "stopped":
            wait_settled(c)
        assert resource.used(c) == 0, f"{resource_name} still in use after {expected.name}"
        # And a later call that needs it gets it
        if state != "stopped":
            if resource.follow is not None:
                assert resource.follow("ok").get(WAIT) == "ok"
            if resource.pause_op is not None:
                c.resume(resource.pause_op)
            assert c.inflight == 0
        recorder.assert_each_settled_once()
    finally:
        EV.gate.set()
        EV.blocker_gate.set()
        c.stop()
    assert resource.used(c) == 0


def wait_settled(c: OperationsCoordinator) -> None:
    """Wait (bounded) until every accepted call settled: refusals and kills settle on the loop."""
    deadline = threading.Event()
    for _ in range(int(WAIT / 0.002)):
        if c.inflight == 0:
            return
        deadline.wait(0.002)
    raise AssertionError(f"{c.inflight} calls still in flight")


def _drive(c: OperationsCoordinator, token: TaskToken[str], state: str, resource: Resource,
           blocker: TaskToken[str] | None) -> TokenState:
    """Bring *token* to *state*; return the TokenState that means."""
    waits = resource.blocker is not None or resource.pause_op is not None
    if state in ("completed", "failed", "rejected_admit"):
        EV.gate.set()
        EV.blocker_gate.set()
        if resource.pause_op is not None:
            c.resume(resource.pause_op)
        error = _retrieve(token)
        if state == "completed":
            assert error is None, error
            return TokenState.COMPLETED
        if state == "failed":
            assert isinstance(error, Boom), error
            return TokenState.FAILED
        assert isinstance(error, Rejected), error
        return TokenState.REJECTED
    if state == "killed":
        assert c.kill(token.token_id).killed
        assert isinstance(_retrieve(token), TokenKilled)
        if not waits:
            c.resume()
        return TokenState.KILLED
    if state == "stopped":
        stopper = threading.Thread(target=c.stop, kwargs={"timeout": 0})
        stopper.start()
        error = _retrieve(token)  # settled by the stop's sweep, whether it had started or not
        EV.gate.set()
        EV.blocker_gate.set()
        stopper.join(WAIT)
        assert not stopper.is_alive()
        assert isinstance(error, TokenKilled), error
        return TokenState.KILLED
    assert state == "timeout"
    if not waits:
        assert EV.entered.wait(WAIT)  # it holds the resource while it runs
    expire(c, token)
    error = _retrieve(token)
    assert isinstance(error, TokenTimeout) and error.started is (not waits), error
    return TokenState.TIMEOUT
