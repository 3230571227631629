"""Tests for tokengate.policies.conductor: call-chain domains, exact pending counts, no deadlock, no leaks."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest

from tokengate import (
    OperationsCoordinator,
    Overloaded,
    Rejected,
    TaskToken,
    TokenKilled,
    TokenState,
    TokenTimeout,
    task_token_guard,
)
from tokengate.errors import ConfigurationError, CoordinatorStopped
from tokengate.fingerprint import DigestPolicy, digest
from tokengate.policies.conductor import ConductorPolicy, current_seed

from virtual_time import NEVER, expire, virtual_loops

from .test_sticky import WAIT, Factory, Refuse, here, outcome, start, sticky_stats, wait_until


def conductor_stats(coordinator: OperationsCoordinator) -> dict[str, Any]:
    policy = coordinator.policy("conductor")
    assert policy is not None
    return policy.stats()


def seed_of(token: TaskToken[Any]) -> str | None:
    return ConductorPolicy.seed_of(token)


# -- tags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "fragment"),
    [
        ({"external_calls": "child"}, r"write \['child'\]"),
        ({"external_calls": []}, "non-empty list"),
        ({"external_calls": ["ok", ""]}, "non-empty strings"),
        ({"external_calls": [3]}, "non-empty strings"),
        ({"external_calls": ["c"], "digest_policy": "md5"}, "DigestPolicy"),
    ],
)
def test_bad_tags_fail_at_decoration(tags: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        task_token_guard(operation_type="bad_lead", tags=tags)(lambda: None)


def test_tag_values_are_normalized() -> None:
    f = task_token_guard(operation_type="norm_lead", tags={"external_calls": ["a", "b"], "digest_policy": "Fast"})(
        lambda: None)
    assert f.tags["external_calls"] == ("a", "b")
    assert f.tags["digest_policy"] is DigestPolicy.FAST


# -- domains -----------------------------------------------------------------------------


def test_hash_conductor_every_chain_stays_on_its_leads_core(standalone: Factory) -> None:
    """The seeds' hash-conductor demo (prior-art §8.3) as a test: 3 leads x 4 children."""
    c, recorder = start(standalone, num_cores=3, workers_per_core=2)
    gate = threading.Event()
    barrier = threading.Barrier(3, timeout=WAIT)

    @task_token_guard(operation_type="conductor_child", tags={"weight": "heavy"})
    def conductor_child(n: int) -> tuple[int, int, str | None]:
        gate.wait(WAIT)  # keep every chain in flight at once
        return n * n, here()[0], current_seed()

    @task_token_guard(operation_type="conductor_lead",
                      tags={"weight": "heavy", "external_calls": ["conductor_child"]})
    def conductor_lead(lead_n: int) -> tuple[int, list[TaskToken[tuple[int, int, str | None]]]]:
        barrier.wait()  # the three leads run at once, so they spread over the cores
        return here()[0], [conductor_child(lead_n * 100 + i) for i in range(4)]

    # Given three concurrent leads, each spawning four children
    leads = [conductor_lead(n) for n in range(3)]
    results = [lead.get(WAIT) for lead in leads]
    stats = conductor_stats(c)
    assert stats["domains"] == 3 and stats["pending"] == 12  # the leads settled; 4 children each remain
    assert all(len(d["seed"]) == 12 for d in stats["listed"])
    gate.set()
    seeds = [seed_of(lead) for lead in leads]
    # Then the seeds are unique and derive from the lead's token id
    assert len(set(seeds)) == 3
    for lead, seed in zip(leads, seeds):
        assert seed == hashlib.sha256(f"{lead.token_id}:{('conductor_child',)!r}".encode()).hexdigest()
    # And every child ran on its lead's core, carrying its lead's seed
    for lead_n, ((lead_core, children), seed) in enumerate(zip(results, seeds)):
        for i, child in enumerate(children):
            assert child.get(WAIT) == ((lead_n * 100 + i) ** 2, lead_core, seed)
    assert {r[0] for r in results} != {None}
    # And no domain is left
    stats = conductor_stats(c)
    assert stats["domains"] == 0 and stats["pending"] == 0
    assert stats["opened_total"] == stats["closed_total"] == 3 and stats["members_total"] == 12
    recorder.assert_each_settled_once()


@pytest.mark.parametrize(("policy", "length"), [("full", 64), ("short", 16), ("fast", 16), ("minimal", 8)])
def test_digest_policy_shapes_the_seed(standalone: Factory, policy: str, length: int) -> None:
    c, _ = start(standalone)

    @task_token_guard(operation_type=f"lead_{policy}", tags={"external_calls": ["x", "y"], "digest_policy": policy})
    def lead() -> str | None:
        return current_seed()

    token = lead()
    seed = token.get(WAIT)
    assert seed is not None and len(seed) == length
    assert seed == digest(f"{token.token_id}:{('x', 'y')!r}", DigestPolicy(policy))


def test_calls_at_any_depth_join_the_domain(standalone: Factory) -> None:
    c, recorder = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="grandchild", tags={"weight": "heavy"})
    def grandchild() -> tuple[int, str | None]:
        gate.wait(WAIT)
        return here()[0], current_seed()

    @task_token_guard(operation_type="middle", tags={"weight": "heavy"})
    def middle() -> TaskToken[tuple[int, str | None]]:
        return grandchild()

    @task_token_guard(operation_type="top", tags={"weight": "heavy", "external_calls": ["middle"]})
    def top() -> tuple[int, str | None, TaskToken[TaskToken[tuple[int, str | None]]]]:
        return here()[0], current_seed(), middle()

    core, seed, mid = top().get(WAIT)
    leaf = mid.get(WAIT)
    # While the grandchild runs, the domain is still open with exactly one member
    assert conductor_stats(c)["pending"] == 1
    gate.set()
    assert leaf.get(WAIT) == (core, seed)
    stats = conductor_stats(c)
    assert stats["domains"] == 0
    assert stats["undeclared_members"] == 1  # grandchild is not in top's external_calls
    recorder.assert_each_settled_once()


def test_lead_inside_a_domain_opens_its_own_on_the_same_core(standalone: Factory) -> None:
    c, recorder = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="leaf", tags={"weight": "heavy"})
    def leaf() -> tuple[int, str | None]:
        gate.wait(WAIT)
        return here()[0], current_seed()

    @task_token_guard(operation_type="inner", tags={"weight": "heavy", "external_calls": ["leaf"]})
    def inner() -> tuple[int, str | None, TaskToken[tuple[int, str | None]]]:
        return here()[0], current_seed(), leaf()

    @task_token_guard(operation_type="outer", tags={"weight": "heavy", "external_calls": ["inner"]})
    def outer() -> tuple[int, str | None, TaskToken[Any]]:
        return here()[0], current_seed(), inner()

    # Given outer -> inner (a lead itself) -> leaf (held)
    outer_core, outer_seed, inner_token = outer().get(WAIT)
    inner_core, inner_seed, leaf_token = inner_token.get(WAIT)
    # Then inner has its own seed but runs on outer's core; outer's domain closed with inner
    assert inner_seed not in (None, outer_seed) and inner_core == outer_core
    stats = conductor_stats(c)
    assert stats["domains"] == 1 and stats["pending"] == 1
    # And leaf joins inner's domain, on the same core
    gate.set()
    assert leaf_token.get(WAIT) == (outer_core, inner_seed)
    stats = conductor_stats(c)
    assert stats["domains"] == 0 and stats["opened_total"] == stats["closed_total"] == 2
    recorder.assert_each_settled_once()


def test_outer_domain_waits_for_a_nested_lead(standalone: Factory) -> None:
    c, _ = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="nested_lead", tags={"weight": "heavy", "external_calls": ["none"]})
    def nested_lead() -> None:
        gate.wait(WAIT)

    @task_token_guard(operation_type="outer_lead", tags={"weight": "heavy", "external_calls": ["nested_lead"]})
    def outer_lead() -> TaskToken[None]:
        return nested_lead()

    nested = outer_lead().get(WAIT)
    # The outer lead settled, but its domain counts the nested lead, which has its own domain too
    stats = conductor_stats(c)
    assert stats["domains"] == 2 and sorted(d["pending"] for d in stats["listed"]) == [1, 1]
    gate.set()
    nested.get(WAIT)
    assert conductor_stats(c)["domains"] == 0


def test_leads_waiting_on_children_never_deadlock(standalone: Factory) -> None:
    """More leads than workers, every worker busy with a lead that blocks in child.get()."""
    c, recorder = start(standalone, num_cores=2, workers_per_core=2)
    lock = threading.Lock()
    started = [0]
    all_busy = threading.Event()

    @task_token_guard(operation_type="dl_child", tags={"weight": "heavy"})
    def dl_child(n: int) -> tuple[int, int]:
        return n, here()[0]

    @task_token_guard(operation_type="dl_lead", tags={"weight": "heavy", "external_calls": ["dl_child"]})
    def dl_lead(n: int) -> int:
        with lock:
            started[0] += 1
            if started[0] == 4:
                all_busy.set()
        assert all_busy.wait(WAIT)  # all four workers now hold a lead
        core = here()[0]
        children = [dl_child(n * 10 + i) for i in range(3)]
        values = [child.get(WAIT) for child in children]
        assert all(child_core == core for _, child_core in values)
        return sum(v for v, _ in values)

    leads = [dl_lead(n) for n in range(6)]
    assert [lead.get(WAIT * 2) for lead in leads] == [30 * n + 3 for n in range(6)]
    assert conductor_stats(c)["domains"] == 0
    recorder.assert_each_settled_once()


def test_sticky_child_of_a_lead_pins_its_key_to_the_domain(standalone: Factory) -> None:
    c, _ = start(standalone, num_cores=3)
    gate = threading.Event()

    @task_token_guard(operation_type="keyed_child", tags={"weight": "heavy", "sticky_anchor": "kc"})
    def keyed_child() -> int:
        gate.wait(WAIT)
        return here()[0]

    @task_token_guard(operation_type="keyed_lead", tags={"weight": "heavy", "external_calls": ["keyed_child"]})
    def keyed_lead() -> tuple[int, list[TaskToken[int]]]:
        return here()[0], [keyed_child(), keyed_child()]

    core, children = keyed_lead().get(WAIT)
    assert sticky_stats(c)["listed"][0]["core"] == core
    gate.set()
    assert [child.get(WAIT) for child in children] == [core, core]


# -- release on every terminal path ------------------------------------------------------


def test_release_when_a_waiting_lead_is_killed(standalone: Factory) -> None:
    c, recorder = start(standalone)

    @task_token_guard(operation_type="doomed", tags={"external_calls": ["x"]})
    def doomed() -> None:
        return None

    c.pause()
    token = doomed()
    assert conductor_stats(c)["domains"] == 1  # opened at submission
    assert c.kill(token.token_id).killed
    with pytest.raises(TokenKilled):
        token.get(WAIT)
    c.resume()
    assert conductor_stats(c)["domains"] == 0
    recorder.assert_each_settled_once()


def test_release_when_children_fail_or_time_out(standalone: Factory) -> None:
    c, recorder = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="bad_child", tags={"weight": "heavy"})
    def bad_child() -> None:
        raise ValueError("child failed")

    @task_token_guard(operation_type="slow_child", tags={"weight": "heavy", "timeout": 0.05})
    def slow_child() -> None:
        gate.wait(WAIT)

    @task_token_guard(operation_type="parent", tags={"weight": "heavy", "external_calls": ["bad_child", "slow_child"]})
    def parent() -> list[TaskToken[None]]:
        # Not waited on here: get() would run them inline on this thread.
        return [bad_child(), slow_child()]

    failing, timing_out = parent().get(WAIT)
    with pytest.raises(ValueError):
        failing.get(WAIT)
    with pytest.raises(TokenTimeout):
        timing_out.get(WAIT)
    # The timed-out child's thread still runs, but the domain is released
    assert conductor_stats(c)["domains"] == 0
    gate.set()
    recorder.assert_each_settled_once()


def test_release_when_a_child_is_refused(standalone: Factory) -> None:
    c, recorder = start(standalone, tail=(Refuse(at_submit=("refused_child",)),))

    @task_token_guard(operation_type="refused_child")
    def refused_child() -> None:
        return None

    @task_token_guard(operation_type="refusing_lead", tags={"external_calls": ["refused_child"]})
    def refusing_lead() -> str:
        try:
            refused_child()
        except Rejected as exc:
            return type(exc).__name__
        return "not refused"

    assert refusing_lead().get(WAIT) == "Rejected"
    stats = conductor_stats(c)
    assert stats["domains"] == 0 and stats["members_total"] == 1
    recorder.assert_each_settled_once()


def test_release_when_a_child_is_overloaded(standalone: Factory) -> None:
    c, recorder = start(standalone, max_pending=0)
    gate = threading.Event()

    @task_token_guard(operation_type="over_child", tags={"weight": "heavy"})
    def over_child() -> None:
        return None

    @task_token_guard(operation_type="over_lead", tags={"weight": "heavy", "external_calls": ["over_child"]})
    def over_lead() -> str:
        gate.wait(WAIT)
        try:
            over_child()
        except Overloaded:
            return "overloaded"
        return "accepted"

    # Given a running lead / When admission pauses, so a child cannot be queued (max_pending=0)
    lead = over_lead()
    wait_until(lambda: lead.state is TokenState.EXECUTING)
    c.pause()
    gate.set()
    # Then the child is refused and still uncounted from the domain
    assert lead.get(WAIT) == "overloaded"
    c.resume()
    assert conductor_stats(c)["domains"] == 0
    recorder.assert_each_settled_once()


def test_release_on_stop_with_children_queued(standalone: Factory) -> None:
    c, recorder = start(standalone, num_cores=1, workers_per_core=1, stop_timeout=0.1)
    gate = threading.Event()
    children: list[TaskToken[None]] = []

    @task_token_guard(operation_type="queued_child")
    def queued_child() -> None:
        return None

    @task_token_guard(operation_type="blocking_lead", tags={"external_calls": ["queued_child"]})
    def blocking_lead() -> None:
        children.extend(queued_child() for _ in range(3))  # queued behind this lead on the only worker
        gate.wait(WAIT)

    lead = blocking_lead()
    wait_until(lambda: len(children) == 3)
    stopper = threading.Thread(target=c.stop)
    stopper.start()
    wait_until(lambda: all(t.done() for t in [lead, *children]))
    gate.set()
    stopper.join(WAIT)
    assert all(isinstance(outcome(t), CoordinatorStopped) for t in [lead, *children])
    assert conductor_stats(c)["domains"] == 0
    recorder.assert_each_settled_once()


def test_timed_out_lead_still_running_reopens_its_domain(standalone: Factory) -> None:
    with virtual_loops():  # the lead times out when the test advances the clock, after it started
        c, recorder = start(standalone)
    gate = threading.Event()
    entered = threading.Event()
    late: list[TaskToken[tuple[int, str | None]]] = []

    @task_token_guard(operation_type="late_child", tags={"weight": "heavy"})
    def late_child() -> tuple[int, str | None]:
        return here()[0], current_seed()

    @task_token_guard(operation_type="late_lead",
                      tags={"weight": "heavy", "external_calls": ["late_child"], "timeout": NEVER})
    def late_lead() -> None:
        entered.set()
        gate.wait(WAIT)
        late.append(late_child())  # made after this lead timed out and its domain closed

    lead = late_lead()
    assert entered.wait(WAIT)
    expire(c, lead)
    with pytest.raises(TokenTimeout) as info:
        lead.get(WAIT)
    assert info.value.started
    assert conductor_stats(c)["domains"] == 0
    seed = seed_of(lead)
    gate.set()
    wait_until(lambda: bool(late))
    core, child_seed = late[0].get(WAIT)
    assert child_seed == seed and core == lead.core_id
    stats = conductor_stats(c)
    assert stats["revived_total"] == 1 and stats["domains"] == 0
    # closings are counted per closing: the revived domain closed twice
    assert stats["opened_total"] + stats["revived_total"] - stats["closed_total"] == stats["domains"]
    recorder.assert_each_settled_once()


# -- inspection --------------------------------------------------------------------------


def test_stats_are_bounded_and_json_ready(standalone: Factory) -> None:
    c = standalone(policies=[ConductorPolicy(max_listed=2)])

    @task_token_guard(operation_type="listed_lead", tags={"external_calls": ["x"]})
    def listed_lead() -> None:
        return None

    c.pause()
    tokens = [listed_lead() for _ in range(3)]
    stats = c.stats()["policies"]["conductor"]
    json.dumps(stats)
    assert stats["domains"] == 3 and len(stats["listed"]) == 2 and stats["truncated"] is True
    assert set(stats["listed"][0]) == {"seed", "lead", "core", "pending", "age", "key"}
    assert stats["listed"][0]["key"] is None  # a lead without sticky_key: its seed comes from its token id
    c.resume()
    for t in tokens:
        t.get(WAIT)
    assert conductor_stats(c)["domains"] == 0


def test_plain_calls_carry_no_conductor_data(standalone: Factory) -> None:
    c, _ = start(standalone)

    @task_token_guard(operation_type="plain_call")
    def plain_call() -> str | None:
        return current_seed()

    token = plain_call()
    assert token.get(WAIT) is None
    assert token.policy_data is None and seed_of(token) is None
    assert current_seed() is None  # not a worker thread
