"""What data locality costs: throughput of sticky, ordered and conducted tokens as ratios against plain ones.

One process, one machine state: every scenario runs in its own fresh
coordinator (attached to one event loop, started before the clock starts),
the scenarios are interleaved repeat by repeat, and each reports the median
tokens/s over its repeats. The clock covers submission *and* completion,
because the locality hooks run at submission.

Scenarios (trivial function bodies, all tokens submitted at once, then gathered):

* ``plain``: no policies installed (the baseline, ratio 1.0);
* ``plain+locality``: the same plain tokens with ``StickyPolicy`` and
  ``ConductorPolicy`` installed; its ratio is what the features cost calls
  that do not use them (the target is ~1.0);
* ``sticky``: ``sticky_anchor`` over ``keys`` distinct argument values (today's
  key: the anchor plus a fingerprint of all the arguments, here one int);
* ``ordered``: ``ordered`` over ``keys`` keys (one at a time per key);
* ``sticky_key`` / ``ordered_key``: the same with the key chosen from the
  arguments, ``sticky_key: "account"``, on calls ``(account, amount, ref)``
  whose amount and ref differ on every call (``keys`` accounts): the form
  users want;
* ``sticky_args3`` / ``ordered_args3``: today's key (all the arguments) on
  the same call shape, with amount and ref tied to the account so that there
  are as many keys. The ``key_form`` ratios compare the new form with these
  (the target: no slower than today's keys);
* ``nested``: parents without tags, each spawning ``children`` children
  from its worker thread (every token counts), the policies installed;
* ``conducted``: the same with ``external_calls``: each chain is pinned to
  its lead's worker domain. Compare it with ``nested`` for the cost of the
  conductor itself, and with ``plain`` for the cost of nesting as well.

``key_cost`` times the key computation alone (no coordinator), in µs per
call, for the same call shapes: all the arguments of ``f(k)`` (today's
``sticky``), all of ``f(account, amount, ref)``, ``sticky_key`` by name on
that call, and a key function (``lambda account, **_: account``).

Usage: ``python -m benchmarks.bench_locality_core`` prints a table; the
benchmark framework calls :func:`run`. Dependency-free (stdlib + tokengate).
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from typing import Any, Awaitable, Callable

from benchmarks._common import settle
from tokengate import OperationsCoordinator, Policy, TaskToken, task_token_guard
from tokengate.fingerprint import ArgumentKey, HashPolicy, routing_key
from tokengate.policies.conductor import ConductorPolicy
from tokengate.policies.sticky import StickyPolicy

__all__ = ["run", "SCENARIOS"]

SCENARIOS = ("plain", "plain+locality", "sticky", "ordered", "sticky_args3", "sticky_key", "ordered_args3",
             "ordered_key", "nested", "conducted")
#: The new key form, and the scenario with today's key on the same call shape it is compared with.
KEY_FORM = {"sticky_key": "sticky_args3", "ordered_key": "ordered_args3"}


@task_token_guard(operation_type="bench_plain", tags={"weight": "light"})
def _plain(i: int) -> int:
    return i


@task_token_guard(operation_type="bench_sticky", tags={"weight": "light", "sticky_anchor": "bench"})
def _sticky(key: int) -> int:
    return key


@task_token_guard(operation_type="bench_ordered", tags={"weight": "light", "sticky_anchor": "bench_o",
                                                         "ordered": True})
def _ordered(key: int) -> int:
    return key


@task_token_guard(operation_type="bench_sticky_key", tags={"weight": "light", "sticky_key": "account"})
def _sticky_key(account: int, amount: int, ref: str) -> int:
    return account


@task_token_guard(operation_type="bench_ordered_key", tags={"weight": "light", "sticky_key": "account",
                                                             "ordered": True})
def _ordered_key(account: int, amount: int, ref: str) -> int:
    return account


@task_token_guard(operation_type="bench_sticky_args3", tags={"weight": "light", "sticky_anchor": "bench_a3"})
def _sticky_args3(account: int, amount: int, ref: str) -> int:
    return account


@task_token_guard(operation_type="bench_ordered_args3", tags={"weight": "light", "sticky_anchor": "bench_oa3",
                                                               "ordered": True})
def _ordered_args3(account: int, amount: int, ref: str) -> int:
    return account


_REFS = tuple(f"ref-{i}" for i in range(997))  # made before the clock starts; prime, so refs and accounts vary apart


@task_token_guard(operation_type="bench_child", tags={"weight": "light"})
def _child(i: int) -> int:
    return i


@task_token_guard(operation_type="bench_lead", tags={"weight": "light", "external_calls": ["bench_child"]})
def _lead(children: int) -> list[TaskToken[int]]:
    return [_child(i) for i in range(children)]


@task_token_guard(operation_type="bench_parent", tags={"weight": "light"})
def _parent(children: int) -> list[TaskToken[int]]:
    return [_child(i) for i in range(children)]


async def _fan_out(n: int, keys: int, children: int, scenario: str) -> int:
    """Submit and gather one scenario's tokens; return how many tokens ran."""
    if scenario in ("plain", "plain+locality"):
        await asyncio.gather(*[_plain(i) for i in range(n)])
        return n
    if scenario == "sticky":
        await asyncio.gather(*[_sticky(i % keys) for i in range(n)])
        return n
    if scenario == "ordered":
        await asyncio.gather(*[_ordered(i % keys) for i in range(n)])
        return n
    if scenario in KEY_FORM:
        fn = _sticky_key if scenario == "sticky_key" else _ordered_key
        await asyncio.gather(*[fn(i % keys, i, _REFS[i % len(_REFS)]) for i in range(n)])
        return n
    if scenario in KEY_FORM.values():
        fn = _sticky_args3 if scenario == "sticky_args3" else _ordered_args3
        await asyncio.gather(*[fn(i % keys, i % keys, _REFS[i % keys % len(_REFS)]) for i in range(n)])
        return n
    leads = max(1, n // (children + 1))
    spawner = _lead if scenario == "conducted" else _parent
    spawned = await asyncio.gather(*[spawner(children) for _ in range(leads)])
    await asyncio.gather(*[child for group in spawned for child in group])
    return leads * (children + 1)


async def _measure(scenario: str, n: int, keys: int, children: int, num_cores: int,
                   workers_per_core: int) -> tuple[float, float]:
    """Return (tokens per wall second, tokens per CPU second of the whole process)."""
    policies: list[Policy] = [] if scenario == "plain" else [StickyPolicy(), ConductorPolicy()]
    coordinator = OperationsCoordinator(num_cores=num_cores, workers_per_core=workers_per_core,
                                        policies=policies, name=f"bench-{scenario}")
    async with coordinator:
        await settle()  # the previous scenario's tokens are freed here, not in this one's timing
        cpu = time.process_time()  # all threads: far less sensitive to other processes than wall time
        start = time.perf_counter()
        done = await _fan_out(n, keys, children, scenario)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
        _check_clean(coordinator, scenario)
    return done / elapsed, done / max(cpu, 1e-9)


def _check_clean(coordinator: OperationsCoordinator, scenario: str) -> None:
    # A benchmark that leaked pins or domains would be measuring a bug.
    policies = coordinator.stats()["policies"]
    if policies and (policies["sticky"]["pins"] or policies["conductor"]["domains"]):
        raise RuntimeError(f"{scenario}: locality state left after the run: {policies}")


def key_cost(calls: int = 20000, repeats: int = 5) -> dict[str, float]:
    """Microseconds per key computation (best of *repeats*), without a coordinator.

    ``all_args_1``: today's key of ``f(k)``; ``all_args_3``: today's key of
    ``f(account, amount, ref)``; ``by_name_3``: ``sticky_key: "account"`` on
    that call; ``function_3``: ``sticky_key: lambda account, **_: account``.
    """
    def three(account: int, amount: int, ref: str) -> None:
        return None

    by_name = ArgumentKey.parse("account").bind(three)
    by_function = ArgumentKey.parse(lambda account, **_: account).bind(three)
    policy = HashPolicy.STANDARD
    empty: dict[str, Any] = {}
    calls_1 = [(i % 64,) for i in range(calls)]
    calls_3 = [(i % 64, i, _REFS[i % len(_REFS)]) for i in range(calls)]
    forms: dict[str, Callable[[], object]] = {
        "all_args_1": lambda: [routing_key("a", args, empty, policy) for args in calls_1],
        "all_args_3": lambda: [routing_key("a", args, empty, policy) for args in calls_3],
        "by_name_3": lambda: [by_name.key("a", args, empty, policy) for args in calls_3],
        "function_3": lambda: [by_function.key("a", args, empty, policy) for args in calls_3],
    }
    best = {name: float("inf") for name in forms}
    for _ in range(repeats):
        for name, form in forms.items():  # interleaved, as the scenarios are
            start = time.perf_counter()
            form()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(seconds / calls * 1e6, 3) for name, seconds in best.items()}


def run(n: int = 20000, repeats: int = 3, *, keys: int = 64, children: int = 4, num_cores: int = 2,
        workers_per_core: int = 4) -> dict[str, Any]:
    """Measure every scenario *repeats* times (interleaved) with *n* tokens; return a JSON-ready dict.

    ``results[scenario]`` holds ``tokens_per_s`` (median), ``samples`` and
    ``ratio`` (median tokens/s divided by the ``plain`` median), plus
    ``cpu_us_per_token`` and ``cpu_ratio``, the same measured in process CPU
    time. ``key_form`` compares the new key form with today's
    (``sticky_key`` over ``sticky``, ``ordered_key`` over ``ordered``: wall and
    CPU ratios, above 1.0 = faster), and ``key_cost`` times the key alone.
    Call from sync code (it runs its own event loop).
    """
    if n < 1 or repeats < 1 or keys < 1 or children < 0:
        raise ValueError(f"n, repeats and keys must be >= 1 and children >= 0, got {n}, {repeats}, {keys}, "
                         f"{children}")
    samples: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    cpu_samples: dict[str, list[float]] = {s: [] for s in SCENARIOS}

    async def main() -> None:
        # Warm-up: first-call costs (plans, fingerprint type caches) stay out of the samples.
        for scenario in SCENARIOS:
            await _measure(scenario, min(n, 500), keys, children, num_cores, workers_per_core)
        for _ in range(repeats):
            for scenario in SCENARIOS:
                wall, cpu = await _measure(scenario, n, keys, children, num_cores, workers_per_core)
                samples[scenario].append(wall)
                cpu_samples[scenario].append(cpu)

    started = time.perf_counter()
    _run(main)
    base = statistics.median(samples["plain"])
    cpu_base = statistics.median(cpu_samples["plain"])
    results = {
        s: {"tokens_per_s": round(statistics.median(v), 1), "samples": [round(x, 1) for x in v],
            "ratio": round(statistics.median(v) / base, 3),
            "cpu_us_per_token": round(1e6 / statistics.median(cpu_samples[s]), 2),
            "cpu_ratio": round(statistics.median(cpu_samples[s]) / cpu_base, 3)}
        for s, v in samples.items()
    }
    return {
        "benchmark": "locality_core",
        "machine": {"python": platform.python_version(), "implementation": platform.python_implementation(),
                    "platform": platform.platform(), "cpus": os.cpu_count()},
        "config": {"n": n, "repeats": repeats, "keys": keys, "children": children, "num_cores": num_cores,
                   "workers_per_core": workers_per_core},
        "results": results,
        "ratios": {s: r["ratio"] for s, r in results.items()},
        "key_form": {
            new: {"vs": old,
                  "ratio": round(statistics.median(samples[new]) / statistics.median(samples[old]), 3),
                  "cpu_ratio": round(statistics.median(cpu_samples[new]) / statistics.median(cpu_samples[old]), 3)}
            for new, old in KEY_FORM.items()
        },
        "key_cost_us": key_cost(min(n, 20000)),
        "notes": [
            "tokens/s = tokens / (submit all + gather all), median of interleaved repeats",
            "ratio: median tokens/s over plain's; cpu_ratio: the same with process CPU time instead of wall "
            "time (steadier on a shared machine); below 1.0 = slower than plain",
            "plain+locality: plain tokens with StickyPolicy and ConductorPolicy installed",
            f"nested/conducted: {children} children per parent, spawned on its worker thread; all tokens count",
            "sticky_key/ordered_key: calls (account, amount, ref) keyed by account, amount and ref differing on "
            "every call; *_args3: today's key (all arguments) on the same call shape, amount and ref tied to the "
            "account; key_form: new form over today's (above 1.0 = faster)",
            "key_cost_us: the key computation alone, best of 5, microseconds per call",
        ],
        "duration_s": round(time.perf_counter() - started, 3),
    }


def _run(main: Callable[[], Awaitable[None]]) -> None:
    async def wrapper() -> None:
        await main()

    asyncio.run(wrapper())


def _table(result: dict[str, Any]) -> str:
    rows = [f"{'scenario':<16} {'tokens/s':>12} {'ratio':>7} {'cpu us/token':>13} {'cpu ratio':>10}"]
    for scenario, r in result["results"].items():
        rows.append(f"{scenario:<16} {r['tokens_per_s']:>12,.0f} {r['ratio']:>7.3f} "
                    f"{r['cpu_us_per_token']:>13.2f} {r['cpu_ratio']:>10.3f}")
    for new, form in result["key_form"].items():
        rows.append(f"{new} vs {form['vs']}: {form['ratio']:.3f}x tokens/s, {form['cpu_ratio']:.3f}x per CPU second")
    rows.append("key alone (us/call): " + ", ".join(f"{k} {v}" for k, v in result["key_cost_us"].items()))
    cfg = result["config"]
    rows.append(f"n={cfg['n']} repeats={cfg['repeats']} keys={cfg['keys']} children={cfg['children']} "
                f"cores={cfg['num_cores']}x{cfg['workers_per_core']} ({result['duration_s']}s)")
    return "\n".join(rows)


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    print(_table(run(size)))
