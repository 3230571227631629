"""Property test: random mixes of sticky, ordered, lead and plain calls leave no pin and no domain behind.

Each example runs a fresh, small coordinator with the locality policies, a
one-shot retry policy and a recorder; submits a random batch (optionally while
admission is paused), kills some of it, and waits until everything settled.
Then: every call meant to succeed returned (a killed or timed-out one may end
so instead) and every call meant to fail raised its own error, every token
settled exactly once, the sticky registry and the conductor are empty, ordered
calls of one key never overlapped, and top-level ordered calls of a key started
in submission order.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokengate import OperationsCoordinator, TaskToken, TokenKilled, TokenTimeout, task_token_guard
from tokengate.policies.conductor import ConductorPolicy
from tokengate.policies.sticky import StickyPolicy

from .test_sticky import WAIT, Recorder, RetryOnce, outcome, wait_until

_lock = threading.Lock()
_running: dict[int, int] = {}  # ordered key -> calls of it running now
_overlaps: list[int] = []  # ordered keys seen running twice at once
_started: dict[int, list[int]] = {}  # ordered key -> tags of calls in start order (first attempts)


def _work(fail: bool) -> None:
    time.sleep(0.0005)  # let calls overlap when nothing prevents it
    if fail:
        raise ValueError("planned failure")


@task_token_guard(operation_type="prop_plain", tags={"weight": "heavy"})
def prop_plain(fail: bool) -> None:
    _work(fail)


@task_token_guard(operation_type="prop_sticky", tags={"weight": "heavy", "sticky_anchor": "prop"})
def prop_sticky(key: int, fail: bool) -> None:
    _work(fail)


@task_token_guard(operation_type="prop_timeout", tags={"weight": "heavy", "sticky_anchor": "prop", "timeout": 0.002})
def prop_timeout(key: int) -> None:
    time.sleep(0.004)  # usually outlives its timeout; either way the key must be released


def _ordered(key: int) -> Any:
    # One function per key: the arguments (fail, tag) must not enter the key, so hash_policy is "none".
    @task_token_guard(operation_type=f"prop_ordered_{key}",
                      tags={"weight": "heavy", "sticky_anchor": f"ord{key}", "ordered": True, "hash_policy": "none"})
    def prop_ordered(fail: bool, tag: int) -> None:
        with _lock:
            _running[key] = _running.get(key, 0) + 1
            if _running[key] > 1:
                _overlaps.append(key)
            _started.setdefault(key, []).append(tag)
        try:
            _work(fail)
        finally:
            with _lock:
                _running[key] -= 1

    return prop_ordered


ORDERED = [_ordered(key) for key in range(3)]


@task_token_guard(operation_type="prop_lead",
                  tags={"weight": "heavy", "external_calls": ["prop_plain", "prop_sticky", "prop_ordered_0"]})
def prop_lead(children: tuple[tuple[str, int, bool], ...], wait: bool, fail: bool) -> list[TaskToken[Any]]:
    tokens: list[TaskToken[Any]] = []
    for kind, key, child_fail in children:
        if kind == "plain" or wait:
            # A worker only waits (get()) on calls that nothing can hold or re-queue after get()
            # started: not a sticky/ordered call (a policy may hold it) and not a failing one (a
            # retry re-queues it where the waiting worker cannot run it inline). Both are core
            # limitations of the inline run in get(), reported separately.
            tokens.append(prop_plain(child_fail and not wait))
        elif kind == "sticky":
            tokens.append(prop_sticky(key, child_fail))
        elif kind == "lead":
            tokens.append(prop_lead((("plain", key, child_fail),), False, False))
        else:
            tokens.append(ORDERED[key](child_fail, -1))
    if wait:
        for token in tokens:
            outcome(token)
    if fail:
        raise ValueError("planned lead failure")
    return tokens


def expect(token: TaskToken[Any], *, ok: bool, killable: bool = False, may_time_out: bool = False,
           children: tuple[tuple[str, int, bool], ...] | None = None, waited: bool = False) -> None:
    """Check *token*'s outcome: success when *ok* (then the lead's children in turn), else its ValueError.

    A call the test killed may also end killed, and one with a timeout timed out.
    """
    result = outcome(token)
    if isinstance(result, BaseException):
        allowed = tuple(kind for kind, on in ((ValueError, not ok), (TokenKilled, killable),
                                              (TokenTimeout, may_time_out)) if on)
        assert allowed and isinstance(result, allowed), f"{token!r} (ok={ok}) ended with {result!r}"
        return
    assert ok, f"{token!r} was meant to fail and returned {result!r}"
    if children is None:
        assert result is None, result
        return
    # A lead returns its children's tokens, made as prop_lead() makes them.
    assert isinstance(result, list) and len(result) == len(children), result
    for child_token, (kind, _key, child_fail) in zip(result, children):
        if kind == "plain" or waited:
            expect(child_token, ok=not (child_fail and not waited))
        elif kind == "lead":
            expect(child_token, ok=True, children=(("plain", 0, child_fail),))
        else:
            expect(child_token, ok=not child_fail)


keys = st.integers(0, 2)
flags = st.booleans()
child = st.tuples(st.sampled_from(["plain", "sticky", "ordered", "lead"]), keys, flags)
call = st.one_of(
    st.tuples(st.just("plain"), keys, flags),
    st.tuples(st.just("sticky"), keys, flags),
    st.tuples(st.just("timeout"), keys, flags),
    st.tuples(st.just("ordered"), keys, flags),
    st.tuples(st.just("lead"), st.tuples(st.lists(child, max_size=3).map(tuple), flags), flags),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(call, min_size=1, max_size=12),
    kills=st.sets(st.integers(0, 11), max_size=4),
    paused=flags,
    num_cores=st.integers(1, 3),
    workers_per_core=st.integers(1, 2),
)
def test_every_pin_and_domain_is_released(calls: list[tuple[str, Any, bool]], kills: set[int], paused: bool,
                                          num_cores: int, workers_per_core: int) -> None:
    with _lock:
        _running.clear()
        _overlaps.clear()
        _started.clear()
    sticky, conductor, recorder = StickyPolicy(), ConductorPolicy(), Recorder()
    c = OperationsCoordinator(num_cores=num_cores, workers_per_core=workers_per_core, stop_timeout=WAIT,
                              policies=[sticky, conductor, RetryOnce(), recorder]).start()
    try:
        # Given a random batch, submitted while admission is (maybe) paused
        if paused:
            c.pause()
        tokens: list[TaskToken[Any]] = []
        submitted_order: dict[int, list[int]] = {}
        for i, (kind, arg, fail) in enumerate(calls):
            if kind == "plain":
                tokens.append(prop_plain(fail))
            elif kind == "sticky":
                tokens.append(prop_sticky(arg, fail))
            elif kind == "timeout":
                tokens.append(prop_timeout(arg))
            elif kind == "ordered":
                submitted_order.setdefault(arg, []).append(i)
                tokens.append(ORDERED[arg](fail, i))
            else:
                children, wait = arg
                tokens.append(prop_lead(children, wait, fail))
        # When some of it is killed (those already running are not) and admission resumes
        for i in kills:
            if i < len(tokens):
                c.kill(tokens[i].token_id)
        if paused:
            c.resume()
        # Then every call ended as it was meant to (a killed one may also have run first)
        for i, (token, (kind, arg, fail)) in enumerate(zip(tokens, calls)):
            if kind == "lead":
                children, wait = arg
                expect(token, ok=not fail, killable=i in kills, children=children, waited=wait)
            else:
                expect(token, ok=not fail or kind == "timeout", killable=i in kills, may_time_out=kind == "timeout")
        wait_until(lambda: c.inflight == 0, WAIT)
        # And nothing is pinned, no domain is open, and every call settled exactly once
        s, d = sticky.stats(), conductor.stats()
        assert (s["pins"], s["inflight"], s["waiting_for_pin"], s["waiting_in_order"]) == (0, 0, 0, 0), s
        assert (d["domains"], d["pending"]) == (0, 0), d
        recorder.assert_each_settled_once()
        # And ordered calls of one key never overlapped; top-level ones started in submission order
        with _lock:
            assert not _overlaps
            for key, started in _started.items():
                top_level = [tag for tag in started if tag >= 0]
                assert top_level == sorted(top_level), (key, started)
                assert set(top_level) <= set(submitted_order.get(key, []))
    finally:
        c.stop()
        # Collect failed tokens nobody awaited now, at a safe point: asyncio logs them from
        # __del__, and on CPython 3.11 formatting that traceback calls ast.parse, which must
        # not happen inside another ast.parse (pytest rewriting a module hypothesis imports late).
        gc.collect()
    assert sticky.stats()["pins"] == 0 and conductor.stats()["domains"] == 0
