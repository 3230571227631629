"""Tests for the ``sticky_key`` tag: sticky, ordered and conductor keys chosen from the arguments.

The common case the tag exists for: ``apply_payment(account_id, amount, ref)``
where every call of one account runs one at a time, in submission order,
while the other arguments differ on every call and other accounts run in
parallel. The tests are deterministic: calls block on events the test sets,
and the test waits for states (``wait_until``), never for time.

Until the decorator runs tag checks against the function (the core hook
proposed with this change), a ``sticky_key`` that does not fit its function is
found when a coordinator first plans the function, and every call is refused;
:func:`misconfigured` accepts either moment and fails if neither refuses.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokengate import OperationsCoordinator, Rejected, TaskToken, TokenKilled, task_token_guard
from tokengate.errors import ConfigurationError
from tokengate.fingerprint import ArgumentKey, StickyKeyError
from tokengate.policies.conductor import ConductorPolicy, current_seed
from tokengate.policies.sticky import StickyPolicy

from .test_sticky import WAIT, Factory, Recorder, outcome, start, sticky_stats, wait_until


class Ledger:
    """Records, per account, which calls run now and in which order they started; the test opens gates."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.started: dict[str, list[Any]] = {}
        self.gates: dict[Any, threading.Event] = {}

    def gate(self, tag: Any) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(tag, threading.Event())

    def enter(self, account: str, tag: Any) -> None:
        with self.lock:
            now = self.running[account] = self.running.get(account, 0) + 1
            self.peak[account] = max(self.peak.get(account, 0), now)
            self.started.setdefault(account, []).append(tag)

    def leave(self, account: str) -> None:
        with self.lock:
            self.running[account] -= 1

    def run(self, account: str, tag: Any, *, block: bool) -> None:
        self.enter(account, tag)
        try:
            if block:
                assert self.gate(tag).wait(WAIT), f"gate {tag!r} never opened"
        finally:
            self.leave(account)

    def now_running(self) -> dict[str, int]:
        with self.lock:
            return {a: n for a, n in self.running.items() if n}

    def order(self, account: str) -> list[Any]:
        with self.lock:
            return list(self.started.get(account, []))


def misconfigured(tags: dict[str, Any], func: Callable[..., Any], standalone: Factory) -> ConfigurationError:
    """The ConfigurationError a bad ``sticky_key`` gives: at decoration, or else at every call."""
    try:
        guarded = task_token_guard(operation_type="misconfigured", tags=tags)(func)
    except ConfigurationError as exc:
        return exc
    c, _ = start(standalone)
    for _ in range(2):  # every call, not only the first
        with pytest.raises(StickyKeyError) as info:
            guarded("x", 1)
        assert isinstance(info.value, ConfigurationError) and isinstance(info.value, Rejected)
    stats = sticky_stats(c)
    assert stats["pins"] == 0 and stats["inflight"] == 0
    assert c.inflight == 0
    return info.value


def _payment(account_id: str, amount: int, ref: str = "") -> None:
    return None


# -- the tag: what it accepts, and what does not fit the function ---------------------


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "parameter names"),
        ("not a name", "parameter names"),
        (3, "parameter name, a tuple"),
        ((), "at least one parameter"),
        (("account_id", "account_id"), "more than once"),
        ((["account_id"],), "parameter names"),
        (str, "parameter name, a tuple"),
    ],
)
def test_bad_values_fail_at_decoration(value: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        task_token_guard(tags={"sticky_key": value})(_payment)


def test_a_coroutine_key_function_fails_at_decoration() -> None:
    async def key(account_id: str, **_: Any) -> str:
        return account_id

    with pytest.raises(ConfigurationError, match="coroutine"):
        task_token_guard(tags={"sticky_key": key})(_payment)


def test_values_are_normalized() -> None:
    guarded = task_token_guard(tags={"sticky_key": ["account_id", "ref"]})(_payment)
    assert guarded.tags["sticky_key"] == ArgumentKey(names=("account_id", "ref"))
    assert repr(guarded.tags["sticky_key"]) == "ArgumentKey('account_id', 'ref')"


def test_a_name_that_is_not_a_parameter_names_the_parameters(standalone: Factory) -> None:
    error = misconfigured({"sticky_key": "acount_id"}, _payment, standalone)
    message = str(error)
    assert "'acount_id'" in message and "_payment(account_id, amount, ref)" in message
    assert "did you mean 'account_id'" in message


def test_a_key_function_that_cannot_take_the_arguments_by_name(standalone: Factory) -> None:
    error = misconfigured({"sticky_key": lambda account_id: account_id}, _payment, standalone)
    assert "**_" in str(error) and "amount" in str(error)


def test_hash_policy_none_contradicts_a_chosen_key(standalone: Factory) -> None:
    error = misconfigured({"sticky_key": "account_id", "hash_policy": "none"}, _payment, standalone)
    assert "hash_policy 'none'" in str(error)


@pytest.mark.parametrize("tags", [{"sticky_key": "acount_id"}, {"sticky_key": "account_id", "hash_policy": "none"},
                                  {"sticky_key": lambda account_id: account_id}])
def test_with_core_tag_checks_a_bad_key_fails_at_decoration(tags: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="tag 'sticky_key'"):
        task_token_guard(operation_type="checked", tags=tags)(_payment)


# -- keys: bound with the signature ----------------------------------------------------


def test_positional_and_keyword_calls_share_one_key(standalone: Factory) -> None:
    c, recorder = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="pay", tags={"weight": "heavy", "sticky_key": "account_id"})
    def pay(account_id: str, amount: int, ref: str = "") -> None:
        gate.wait(WAIT)

    tokens = [pay("acme", 1), pay("acme", 2, "r2"), pay(amount=3, account_id="acme"), pay("acme", amount=4, ref="x"),
              pay("globex", 5)]
    stats = sticky_stats(c)
    # Then two keys, listed by the chosen values only (the admin API shows these)
    assert stats["pins"] == 2
    assert sorted((p["key"], p["inflight"]) for p in stats["listed"]) == [("('pay', 'acme')", 4),
                                                                           ("('pay', 'globex')", 1)]
    gate.set()
    for t in tokens:
        t.get(WAIT)
    cores = {t.core_id for t in tokens[:4]}
    assert len(cores) == 1, cores
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_defaults_keyword_only_and_several_names(standalone: Factory) -> None:
    c, _ = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="move", tags={"weight": "heavy", "sticky_key": ("region", "account")})
    def move(account: str, amount: int, *, region: str = "eu") -> None:
        gate.wait(WAIT)

    tokens = [move("a", 1), move("a", 2, region="eu"), move(account="a", amount=3, region="us"), move("b", 4)]
    keys = sorted(p["key"] for p in sticky_stats(c)["listed"])
    assert keys == ["('move', ('eu', 'a'))", "('move', ('eu', 'b'))", "('move', ('us', 'a'))"]
    gate.set()
    for t in tokens:
        t.get(WAIT)


def test_a_key_function_derives_the_key(standalone: Factory) -> None:
    c, _ = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="login",
                      tags={"weight": "heavy", "sticky_key": lambda email, **_: email.strip().lower()})
    def login(email: str, attempt: int = 1) -> None:
        gate.wait(WAIT)

    tokens = [login("Ann@X.org"), login(" ann@x.org", 2), login(attempt=3, email="ANN@x.ORG"), login("bob@x.org")]
    stats = sticky_stats(c)
    assert sorted((p["key"], p["inflight"]) for p in stats["listed"]) == [("('login', 'ann@x.org')", 3),
                                                                           ("('login', 'bob@x.org')", 1)]
    gate.set()
    for t in tokens:
        t.get(WAIT)


def test_a_key_function_that_raises_refuses_only_that_call(standalone: Factory) -> None:
    c, _ = start(standalone)

    @task_token_guard(operation_type="parse", tags={"weight": "heavy", "sticky_key": lambda doc, **_: doc["id"]})
    def parse(doc: dict[str, Any]) -> Any:
        return doc["id"]

    with pytest.raises(StickyKeyError, match="KeyError") as info:
        parse({"no id": 1})
    assert isinstance(info.value.__cause__, KeyError)
    assert info.value.operation_type == "parse" and info.value.reason == "sticky_key"
    assert parse({"id": 7}).get(WAIT) == 7
    assert c.inflight == 0 and sticky_stats(c)["pins"] == 0


def test_hash_policy_applies_to_the_chosen_values(standalone: Factory) -> None:
    @dataclasses.dataclass(frozen=True)
    class Doc:
        ident: int

    c, _ = start(standalone)
    gate = threading.Event()

    @task_token_guard(operation_type="std", tags={"weight": "heavy", "sticky_key": "doc"})
    def std(doc: Doc, n: int) -> None:
        gate.wait(WAIT)

    @task_token_guard(operation_type="fast", tags={"weight": "heavy", "sticky_key": "doc", "hash_policy": "fast"})
    def fast(doc: Doc, n: int) -> None:
        gate.wait(WAIT)

    # Equal but distinct objects: one key under "standard" (by value), two under "fast" (by identity)
    tokens = [std(Doc(1), 1), std(Doc(1), 2), fast(Doc(1), 1), fast(Doc(1), 2)]
    inflight = sorted(p["inflight"] for p in sticky_stats(c)["listed"])
    assert inflight == [1, 1, 2]
    gate.set()
    for t in tokens:
        t.get(WAIT)


def test_a_method_keys_by_its_parameters_not_by_self(standalone: Factory) -> None:
    c, _ = start(standalone)
    gate = threading.Event()

    class Service:
        @task_token_guard(operation_type="svc", tags={"weight": "heavy", "sticky_key": "account"})
        def handle(self, account: str, payload: int) -> str:
            gate.wait(WAIT)
            return account

    a, b = Service(), Service()
    tokens = [a.handle("acme", 1), b.handle(account="acme", payload=2)]
    assert [p["key"] for p in sticky_stats(c)["listed"]] == ["('svc', 'acme')"]
    gate.set()
    assert [t.get(WAIT) for t in tokens] == ["acme", "acme"]


def test_a_call_missing_its_key_argument_fails_as_python_would(standalone: Factory) -> None:
    c, recorder = start(standalone)

    @task_token_guard(operation_type="needs", tags={"weight": "heavy", "sticky_key": "account"})
    def needs(account: str) -> str:
        return account

    result = outcome(needs())  # type: ignore[call-arg]
    assert isinstance(result, TypeError)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


# -- ordered by account ---------------------------------------------------------------------


def test_ordered_by_account_with_varying_arguments(standalone: Factory) -> None:
    """Each account strictly in submission order, one call at a time; accounts in parallel."""
    c, recorder = start(standalone, num_cores=2, workers_per_core=3)
    ledger = Ledger()

    @task_token_guard(operation_type="apply_payment",
                      tags={"weight": "heavy", "sticky_key": "account_id", "ordered": True})
    def apply_payment(account_id: str, amount: int, ref: str) -> int:
        ledger.run(account_id, ref, block=True)
        return amount

    # Given three accounts, each with five calls whose other arguments all differ, spelled both ways
    accounts = ["acme", "globex", "initech"]
    tokens: dict[str, list[TaskToken[int]]] = {a: [] for a in accounts}
    for i in range(5):
        for a in accounts:
            ref = f"{a}-{i}"
            token = apply_payment(a, 100 + i, ref) if i % 2 else apply_payment(ref=ref, amount=100 + i, account_id=a)
            tokens[a].append(token)
    # Then the first call of every account runs at the same time (accounts in parallel),
    # and nothing else of those accounts does
    wait_until(lambda: ledger.now_running() == {a: 1 for a in accounts})
    assert sticky_stats(c)["waiting_in_order"] == 12
    # When each account's running call is let go, one at a time
    for i in range(5):
        for a in accounts:
            wait_until(lambda: ledger.order(a)[-1:] == [f"{a}-{i}"])
            assert ledger.now_running().get(a) == 1
            ledger.gate(f"{a}-{i}").set()
    # Then every account ran strictly in submission order, never two of its calls at once
    for a in accounts:
        assert [t.get(WAIT) for t in tokens[a]] == [100 + i for i in range(5)]
        assert ledger.order(a) == [f"{a}-{i}" for i in range(5)]
        assert ledger.peak[a] == 1
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_functions_sharing_an_anchor_are_ordered_together_by_value(standalone: Factory) -> None:
    c, _ = start(standalone)
    ledger = Ledger()
    tags = {"weight": "heavy", "sticky_anchor": "account", "ordered": True}

    @task_token_guard(operation_type="deposit", tags={**tags, "sticky_key": "account_id"})
    def deposit(account_id: str, amount: int) -> None:
        ledger.run(account_id, ("deposit", amount), block=True)

    @task_token_guard(operation_type="withdraw", tags={**tags, "sticky_key": "account"})
    def withdraw(amount: int, account: str) -> None:
        ledger.run(account, ("withdraw", amount), block=True)

    tokens = [deposit("acme", 1), withdraw(2, "acme"), deposit("acme", 3), withdraw(4, account="other")]
    # The other account runs beside the first acme call; the rest of acme waits in one queue
    wait_until(lambda: ledger.now_running() == {"acme": 1, "other": 1})
    assert sticky_stats(c)["waiting_in_order"] == 2
    for step in [("deposit", 1), ("withdraw", 2), ("deposit", 3), ("withdraw", 4)]:
        ledger.gate(step).set()
    for t in tokens:
        t.get(WAIT)
    assert ledger.order("acme") == [("deposit", 1), ("withdraw", 2), ("deposit", 3)]
    assert ledger.peak["acme"] == 1


def test_a_killed_call_leaves_its_account_queue(standalone: Factory) -> None:
    c, recorder = start(standalone)
    ledger = Ledger()

    @task_token_guard(operation_type="pay_k", tags={"weight": "heavy", "sticky_key": "account_id", "ordered": True})
    def pay_k(account_id: str, ref: int) -> int:
        ledger.run(account_id, ref, block=ref == 0)
        return ref

    tokens = [pay_k("acme", i) for i in range(4)]
    wait_until(lambda: sticky_stats(c)["waiting_in_order"] == 3)
    assert c.kill(tokens[1].token_id).killed
    ledger.gate(0).set()
    results = [outcome(t) for t in tokens]
    assert results[0] == 0 and isinstance(results[1], TokenKilled) and results[2:] == [2, 3]
    assert ledger.order("acme") == [0, 2, 3]
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


# -- conductor leads ------------------------------------------------------------------------


@task_token_guard(operation_type="kc_child", tags={"weight": "light"})
def kc_child(n: int) -> tuple[int | None, str | None]:
    from .test_sticky import here

    return here()[0], current_seed()


def test_conductor_leads_keyed_by_account(standalone: Factory) -> None:
    c, recorder = start(standalone, num_cores=3, workers_per_core=2)
    gates = {name: threading.Event() for name in ("a1", "a2", "b1")}

    @task_token_guard(operation_type="kc_lead",
                      tags={"weight": "heavy", "external_calls": ["kc_child"], "sticky_key": "account"})
    def kc_lead(account: str, run: str) -> tuple[str | None, list[TaskToken[Any]]]:
        gates[run].wait(WAIT)
        return current_seed(), [kc_child(i) for i in range(3)]

    leads = {"a1": kc_lead("acme", "a1"), "a2": kc_lead(run="a2", account="acme"), "b1": kc_lead("globex", "b1")}
    conductor = c.policy("conductor")
    assert conductor is not None
    wait_until(lambda: conductor.stats()["domains"] == 3)
    listed = conductor.stats()["listed"]
    # The admin API lists each domain's key by the chosen value
    assert sorted(d["key"] for d in listed) == ["('kc_lead', 'acme')", "('kc_lead', 'acme')",
                                                 "('kc_lead', 'globex')"]
    # Both acme leads are pinned to one domain while in flight
    assert sticky_stats(c)["pins"] == 2
    for gate in gates.values():
        gate.set()
    results = {name: token.get(WAIT) for name, token in leads.items()}
    # Same key, same seed; another key, another seed
    assert results["a1"][0] == results["a2"][0] != results["b1"][0]
    assert leads["a1"].core_id == leads["a2"].core_id
    # Every child ran on its lead's domain, inside its lead's seed
    for name, (seed, children) in results.items():
        for child in children:
            core, child_seed = child.get(WAIT)
            assert (core, child_seed) == (leads[name].core_id, seed)
    wait_until(lambda: conductor.stats()["domains"] == 0)
    assert sticky_stats(c)["pins"] == 0
    recorder.assert_each_settled_once()


def test_ordered_leads_of_one_key_run_one_at_a_time(standalone: Factory) -> None:
    c, _ = start(standalone, num_cores=2, workers_per_core=3)
    ledger = Ledger()

    @task_token_guard(operation_type="ord_lead",
                      tags={"weight": "heavy", "external_calls": ["kc_child"], "sticky_key": "account",
                            "ordered": True})
    def ord_lead(account: str, run: int) -> int:
        ledger.run(account, run, block=True)
        return kc_child(run).get(WAIT)[0] or 0

    tokens = [ord_lead("acme", i) for i in range(3)]
    wait_until(lambda: ledger.now_running() == {"acme": 1} and sticky_stats(c)["waiting_in_order"] == 2)
    for i in range(3):
        ledger.gate(i).set()
    assert [t.get(WAIT) for t in tokens] == [t.core_id for t in tokens]
    assert ledger.order("acme") == [0, 1, 2] and ledger.peak["acme"] == 1


def test_a_conductor_alone_refuses_a_lead_whose_key_fails(standalone: Factory) -> None:
    recorder = Recorder()
    c = standalone(policies=[ConductorPolicy(), recorder], num_cores=2, workers_per_core=1)

    @task_token_guard(operation_type="lone_lead",
                      tags={"weight": "heavy", "external_calls": ["kc_child"], "sticky_key": lambda n, **_: 1 // n})
    def lone_lead(n: int) -> str | None:
        return current_seed()

    with pytest.raises(StickyKeyError, match="ZeroDivisionError"):
        lone_lead(0)
    assert lone_lead(2).get(WAIT) == lone_lead(3).get(WAIT) is not None  # 1 // n == 0 for both: one seed
    assert lone_lead(1).get(WAIT) != lone_lead(2).get(WAIT)
    conductor = c.policy("conductor")
    assert conductor is not None and conductor.stats()["domains"] == 0


# -- random interleavings ---------------------------------------------------------------------

_prop = Ledger()


@task_token_guard(operation_type="prop_pay", tags={"weight": "heavy", "sticky_key": "account", "ordered": True})
def prop_pay(account: str, amount: int, ref: int, fail: bool = False) -> int:
    _prop.run(account, ref, block=False)
    if fail:
        raise ValueError(f"payment {ref} failed")
    return amount


calls = st.lists(
    st.tuples(st.sampled_from(["acme", "globex", "initech"]), st.integers(-1000, 1000), st.booleans(),
              st.booleans()),
    min_size=1, max_size=30)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=calls, kills=st.sets(st.integers(0, 29), max_size=5), paused=st.booleans(),
       num_cores=st.integers(1, 3), workers_per_core=st.integers(1, 3))
def test_random_interleavings_keep_each_account_in_order(calls: list[tuple[str, int, bool, bool]], kills: set[int],
                                                         paused: bool, num_cores: int, workers_per_core: int) -> None:
    with _prop.lock:
        _prop.running.clear()
        _prop.peak.clear()
        _prop.started.clear()
    sticky, recorder = StickyPolicy(), Recorder()
    c = OperationsCoordinator(num_cores=num_cores, workers_per_core=workers_per_core, stop_timeout=WAIT,
                              policies=[sticky, ConductorPolicy(), recorder]).start()
    try:
        # Given random calls of three accounts, spelled positionally or by keyword, some failing,
        # submitted while admission is (maybe) paused, and some killed
        if paused:
            c.pause()
        tokens = []
        for ref, (account, amount, by_keyword, fail) in enumerate(calls):
            if by_keyword:
                tokens.append(prop_pay(fail=fail, ref=ref, amount=amount, account=account))
            else:
                tokens.append(prop_pay(account, amount, ref, fail))
        killed = {i for i in kills if i < len(tokens) and c.kill(tokens[i].token_id).killed}
        if paused:
            c.resume()
        # Then every call ended as its arguments say (or killed, if the kill came before it started)
        for i, (token, (account, amount, _, fail)) in enumerate(zip(tokens, calls)):
            result = outcome(token)
            if i in killed:
                assert isinstance(result, TokenKilled), result
            elif fail:
                assert isinstance(result, ValueError), result
            else:
                assert result == amount
        wait_until(lambda: c.inflight == 0)
        # And each account's calls that ran started in submission order, never two at once
        for account in {a for a, *_ in calls}:
            expected = [ref for ref, (a, *_) in enumerate(calls) if a == account and ref not in killed]
            assert _prop.order(account) == expected
            assert _prop.peak.get(account, 0) <= 1
        s = sticky.stats()
        assert (s["pins"], s["inflight"], s["waiting_in_order"], s["waiting_for_pin"]) == (0, 0, 0, 0), s
        recorder.assert_each_settled_once()
    finally:
        c.stop()


# -- the locality benchmark's new key form --------------------------------------------------


@pytest.mark.slow
def test_the_locality_benchmark_measures_the_new_key_form() -> None:
    """Shape only (never speed): every scenario ran, leaving no pin or domain behind (run() checks that)."""
    from benchmarks import bench_locality_core

    result = bench_locality_core.run(n=300, repeats=1, keys=8)
    assert set(result["results"]) == set(bench_locality_core.SCENARIOS)
    assert all(r["tokens_per_s"] > 0 for r in result["results"].values())
    assert set(result["key_form"]) == {"sticky_key", "ordered_key"}
    assert {f["vs"] for f in result["key_form"].values()} == {"sticky_args3", "ordered_args3"}
    assert set(result["key_cost_us"]) == {"all_args_1", "all_args_3", "by_name_3", "function_3"}
    assert all(cost > 0 for cost in result["key_cost_us"].values())
