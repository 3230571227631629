"""The blocking work the example app runs: plain ``def`` functions decorated with ``task_token_guard``.

Each function is ordinary sync code (``time.sleep``, file I/O, CPU loops).
Calling one returns a :class:`~tokengate.TaskToken` at once; the endpoints in
:mod:`example_app.app` ``await`` it, so the event loop never blocks. The tags
choose what each call demonstrates:

==========================  ==========================================================
function                    tags and what they show
==========================  ==========================================================
``light_cpu``               ``weight: light``: short CPU work on the light domains
``medium_cpu``              ``weight: medium``
``heavy_block``             ``weight: heavy``: a blocking sleep, kept off the light domains
``disk_roundtrip``          ``storage_speed: slow``: at most 2 run at once (tier limit)
``user_cache``              ``sticky_anchor``: one user's overlapping calls share a domain
``ledger_append``           ``sticky_key`` + ``ordered``: per account, one at a time
``build_report``            ``external_calls``: a lead whose children run on its domain
``process_batch``           no tag: quarantined when its argument size spikes
``flaky``                   ``retries``: fails a few times, then succeeds on the same token
``always_fails``            no tag: its reputation sinks until it is auto-blocked
``slow``                    ``weight: heavy``: a long call to watch a drain wait for it
``crunch``                  ``lane: process``: pure-Python CPU work in a worker process
``crash``                   ``lane: process``: ends its worker process; only its call fails
==========================  ==========================================================

The two process-lane functions run in worker processes, which import this
module by name (``example_app.work``) and call the undecorated function:
that is why decorated functions live in an importable module, never in
``__main__`` or inside another function.

Operation types are ``example.<name>``; the admin API takes them in paths,
e.g. ``POST /tokengate/operations/example.slow/pause``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Any

from tokengate import task_token_guard
from tokengate.policies.conductor import current_seed

__all__ = [
    "AttemptCounter",
    "DemoFailure",
    "FlakyError",
    "always_fails",
    "build_report",
    "crash",
    "crunch",
    "disk_roundtrip",
    "flaky",
    "heavy_block",
    "ledger_append",
    "light_cpu",
    "medium_cpu",
    "process_batch",
    "report_part",
    "slow",
    "user_cache",
]


@task_token_guard(operation_type="example.light_cpu", tags={"weight": "light"})
def light_cpu(n: int) -> int:
    """Sum of the squares below *n*: pure-Python CPU, microseconds to milliseconds."""
    return sum(i * i for i in range(n))


@task_token_guard(operation_type="example.medium_cpu", tags={"weight": "medium"})
def medium_cpu(rounds: int) -> str:
    """Chain *rounds* SHA-256 hashes and return the last one (hex)."""
    value = b"tokengate"
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return value.hex()


@task_token_guard(operation_type="example.heavy_block", tags={"weight": "heavy"})
def heavy_block(ms: int) -> int:
    """Block the worker thread for *ms* milliseconds (a stand-in for a slow library call)."""
    time.sleep(ms / 1000)
    return ms


@task_token_guard(operation_type="example.disk_roundtrip", tags={"weight": "medium", "storage_speed": "slow"})
def disk_roundtrip(kb: int, ms: int) -> dict[str, Any]:
    """Write *kb* KiB to a temporary file, fsync, wait *ms* ms (a slow disk), read it back.

    The tier ``slow`` lets only a few of these run at once (see
    ``StorageTierPolicy(limits=...)`` in the app); the others wait in the
    tier's queue without occupying a worker thread.
    """
    data = os.urandom(kb * 1024)
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
        time.sleep(ms / 1000)
        handle.seek(0)
        read_back = handle.read()
    return {"bytes": len(read_back), "sha256": hashlib.sha256(read_back).hexdigest()[:16],
            "intact": read_back == data}


@task_token_guard(operation_type="example.user_cache",
                  tags={"weight": "medium", "sticky_anchor": "user-cache"})
def user_cache(user_id: str) -> dict[str, str]:
    """Look up a user's (pretend) cache entry; sticky: calls for one user share a worker domain.

    The sticky key is the anchor ``"user-cache"`` plus the arguments, so each
    ``user_id`` has its own key. While any call of a key is in flight, later
    ones go to the same domain, where its cache would be warm.
    """
    time.sleep(0.02)  # long enough for the calls of one request to overlap
    return {"user_id": user_id, "profile": f"profile-of-{user_id}"}


# A pretend database: account -> entries appended. Deliberately unsynchronised:
# `ordered=True` is what keeps the read-modify-write below correct.
_LEDGER: dict[str, int] = {}


@task_token_guard(operation_type="example.ledger_append",
                  tags={"weight": "light", "sticky_key": "account", "ordered": True})
def ledger_append(account: str, amount: int) -> int:
    """Append an entry of *amount* to *account* and return its sequence number (1, 2, 3...).

    A read, a pause, a write: two concurrent calls for one account would both
    read the same value and lose an entry. ``sticky_key: "account"`` makes the
    account alone the key (the amount differs on every call), and ``ordered``
    runs the calls of one key one at a time in submission order; different
    accounts still run in parallel.
    """
    seen = _LEDGER.get(account, 0)
    time.sleep(0.005)  # the window in which an unordered twin would read the same value
    _LEDGER[account] = seen + 1
    return seen + 1


@task_token_guard(operation_type="example.report_part", tags={"weight": "medium"})
def report_part(index: int) -> int:
    """One piece of a report (a child of ``build_report``)."""
    time.sleep(0.005)
    return index * index


@task_token_guard(operation_type="example.build_report",
                  tags={"weight": "heavy", "external_calls": ["example.report_part"]})
def build_report(parts: int) -> dict[str, Any]:
    """A conductor lead: start *parts* children, wait for them, report where each ran.

    Every call made while this one runs joins its domain and is routed to the
    lead's worker domain (``report_part`` is ``medium``, which alone would
    never go to domain 1 where heavy leads usually run). Waiting with
    ``.get()`` on a worker thread cannot deadlock: a child that has not
    started is run inline by the waiting worker.
    """
    children = [report_part(i) for i in range(parts)]
    values = [child.get(timeout=30) for child in children]
    return {
        "seed": current_seed(),
        "children": [
            {"token_id": child.token_id, "core_id": child.core_id, "worker_id": child.worker_id, "value": value}
            for child, value in zip(children, values)
        ],
    }


@task_token_guard(operation_type="example.process_batch", tags={"weight": "medium"})
def process_batch(items: list[int]) -> dict[str, Any]:
    """Summarise a batch of numbers. A batch far larger than usual is quarantined before it runs."""
    ordered = sorted(items)
    return {
        "count": len(ordered),
        "sum": sum(ordered),
        "min": ordered[0] if ordered else None,
        "max": ordered[-1] if ordered else None,
        "median": ordered[len(ordered) // 2] if ordered else None,
    }


class FlakyError(RuntimeError):
    """A transient failure of ``flaky`` (the only exception it is retried on)."""


class AttemptCounter:
    """Counts the runs of one ``flaky`` call: every retry gets the same arguments, so the same counter.

    No ``__repr__`` on purpose: the quarantine fingerprints failing calls by
    their arguments, and the default repr (with the object's address) keeps
    each request's fingerprint its own.
    """

    def __init__(self) -> None:
        self.runs = 0


@task_token_guard(operation_type="example.flaky",
                  tags={"weight": "light", "retries": 3, "retry_backoff": {"base": 0.05, "cap": 0.5},
                        "retry_on": FlakyError})
def flaky(fail_times: int, counter: AttemptCounter) -> dict[str, int]:
    """Fail the first *fail_times* runs with ``FlakyError``, then succeed.

    The retry policy runs the SAME token again after a jittered backoff; the
    awaiter sees only the final outcome, and ``token.attempt`` says which
    attempt succeeded.
    """
    counter.runs += 1
    if counter.runs <= fail_times:
        raise FlakyError(f"simulated transient failure {counter.runs} of {fail_times}")
    return {"runs": counter.runs}


class DemoFailure(RuntimeError):
    """What ``always_fails`` raises."""


@task_token_guard(operation_type="example.always_fails", tags={"weight": "light"})
def always_fails(request_no: int) -> None:
    """Always raise ``DemoFailure``.

    *request_no* differs per request, so the quarantine's poison-call trigger
    (identical arguments failing again and again) does not fire and the
    reputation policy is what reacts: it auto-blocks the operation.
    """
    raise DemoFailure(f"request {request_no}: this operation always fails, on purpose")


@task_token_guard(operation_type="example.slow", tags={"weight": "heavy"})
def slow(seconds: float) -> float:
    """Block for *seconds*: long enough to watch it in /tokengate/workers or make a drain wait."""
    time.sleep(seconds)
    return seconds


@task_token_guard(operation_type="example.crunch", tags={"lane": "process", "weight": "heavy"})
def crunch(n: int) -> dict[str, int]:
    """*n* rounds of a pure-Python checksum in a worker process (about 20 ms for 200,000 here).

    Pure-Python CPU work holds the GIL, so on threads it never runs on more
    than one core at a time; on the process lane each worker process has its
    own interpreter and its own GIL. ``pid`` shows which process ran it.
    """
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) % 1_000_003
    return {"n": n, "checksum": acc, "pid": os.getpid()}


@task_token_guard(operation_type="example.crash", tags={"lane": "process", "weight": "light"})
def crash(request_no: int) -> None:
    """End this worker process at once with exit status 3, as a segfault or the OOM killer would.

    ``os._exit`` runs no cleanup and raises nothing. Only this call fails
    (``WorkerCrashed``, answered 502 ``worker_crashed``); the process is
    replaced before its next call and every other call goes on. *request_no*
    differs per request, so the quarantine's poison-call trigger (identical
    arguments failing again and again) does not fire; the reputation policy
    blocks the operation after 5 crashes in a row, like ``always_fails``.
    """
    os._exit(3)
