"""Quarantine under database faults: locked, read-only, full, corrupt; the loop never waits for SQLite.

Fail-open, as the README defines it: a call is reported quarantined only once
its record is committed; when that cannot happen within ``write_timeout`` (or
at all), the call runs as if no trigger had fired. Every test checks both
halves: the coordinator keeps serving, and no acknowledged call is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tokengate import OperationsCoordinator, Policy, TokenQuarantined, TokenState, task_token_guard
from tokengate.policies.quarantine import QuarantinePolicy
from tokengate.quarantine.store import QuarantineRecord, QuarantineStore, QuarantineStoreError


@task_token_guard(operation_type="qf.add")
def add(a: int, b: int) -> int:
    return a + b


@task_token_guard(operation_type="qf.echo")
def echo(x: Any) -> Any:
    return x


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "faults.sqlite3")


@contextlib.contextmanager
def running(*policies: Policy) -> Iterator[OperationsCoordinator]:
    coordinator = OperationsCoordinator(num_cores=1, workers_per_core=2, policies=list(policies), name="qfaults")
    coordinator.start()
    try:
        yield coordinator
    finally:
        coordinator.stop(timeout=10)


@contextlib.contextmanager
def locked(db: str) -> Iterator[sqlite3.Connection]:
    """Another connection (as another process would) holding the database's write lock."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
        conn.close()


def writer_conn(policy: QuarantinePolicy) -> sqlite3.Connection:
    """The writer thread's connection (white box: to inject a fault into it)."""
    writer = policy._writer
    assert writer is not None and writer.store is not None and writer.store._conn is not None
    return writer.store._conn


def quarantine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tokengate-quarantine-")]


# -- locked: the loop keeps running while the writer waits -----------------------------------------------


def test_a_locked_database_does_not_freeze_the_loop(db: str) -> None:
    events: list[str] = []

    async def main() -> None:
        # write_timeout is long: the test ends the lock itself, so nothing here races a timer
        policy = QuarantinePolicy(db, write_timeout=60)
        async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy], name="qlock"):
            policy.hold("qf.add")
            with locked(db) as other:
                # When a call is quarantined on the loop while another process holds the lock
                token = add(1, 2)
                events.append("submitted")
                token.add_done_callback(lambda _: events.append("settled"))
                # Then the loop keeps running: other calls complete, a listing answers
                for _ in range(3):
                    await asyncio.sleep(0)
                events.append("loop ran")
                assert await echo("probe") == "probe"
                events.append("other call completed")
                assert policy.list() == []  # the read connection does not wait for the write lock
                assert token.state is TokenState.WAITING  # held until its record is written
                other.execute("COMMIT")
            # And once the lock is gone, the record is written and the caller learns the id
            with pytest.raises(TokenQuarantined) as info:
                await token
            events.append("quarantined")
            assert token.state is TokenState.QUARANTINED
            record = policy.get(info.value.quarantine_id)
            assert record is not None and record["status"] == "pending" and record["payload_kept"]

    asyncio.run(main())
    assert events == ["submitted", "loop ran", "other call completed", "settled", "quarantined"]


def test_a_lock_held_past_write_timeout_admits_the_call_and_stores_nothing(db: str) -> None:
    async def main() -> None:
        policy = QuarantinePolicy(db, write_timeout=0.2)
        async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy], name="qlock2"):
            policy.hold("qf.add")
            with locked(db):
                # When the record cannot be written in time, the call runs (fail-open)
                assert await add(2, 3) == 5
            assert policy.flush()
            # Then no record was left behind for it, and the failure is counted
            assert policy.list() == []
            assert policy.stats()["store_errors"] == 1
            # And once the lock is gone, quarantine works again
            with pytest.raises(TokenQuarantined):
                await add(2, 3)

    asyncio.run(main())


def test_a_sync_caller_waits_at_most_write_timeout(db: str) -> None:
    policy = QuarantinePolicy(db, write_timeout=0.2)
    with running(policy):
        policy.hold("qf.add")
        with locked(db):
            # A call from a thread without a loop waits for the write, then runs it
            assert add(4, 4).get(timeout=10) == 8
        assert policy.flush()
        assert policy.list() == [] and policy.stats()["store_errors"] == 1


class SlowCommit(QuarantineStore):
    """Pauses inside the write transaction, after the records were chosen: the COMMIT is about to land."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inside = threading.Event()
        self.proceed = threading.Event()

    def insert(self, records: Any, *, select: Any = None) -> Any:
        def chosen(rs: list[QuarantineRecord]) -> list[QuarantineRecord]:
            picked = select(rs) if select is not None else rs
            self.inside.set()
            self.proceed.wait(30)
            return picked

        return super().insert(records, select=chosen)


def test_a_record_committed_after_its_call_was_killed_is_discarded_not_left_pending(db: str) -> None:
    store = SlowCommit(db)

    async def main() -> None:
        policy = QuarantinePolicy(store)
        async with OperationsCoordinator(num_cores=1, workers_per_core=2, policies=[policy], name="qorphan"):
            policy.hold("qf.add")
            token = add(1, 1)
            await asyncio.to_thread(store.inside.wait, 30)
            # When the call is killed while its record is being committed
            assert token.kill().killed
            store.proceed.set()
            assert await asyncio.to_thread(policy.flush)
            # Then the record that landed can never be released (the caller was told "killed")
            [record] = policy.list()
            assert record["status"] == "discarded" and "before this record was committed" in record["outcome_summary"]
            assert policy.stats()["orphans_discarded"] == 1
            assert token.state is TokenState.KILLED

    try:
        asyncio.run(main())
    finally:
        store.proceed.set()
        store.close()


# -- read-only, full, corrupt --------------------------------------------------------------------------


def test_a_read_only_database_admits_calls_and_logs_once_per_interval(db: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    policy = QuarantinePolicy(db, log_interval=3600)
    with running(policy):
        policy.hold("qf.add")
        writer_conn(policy).execute("PRAGMA query_only = ON")  # every write now fails: SQLITE_READONLY
        with caplog.at_level(logging.ERROR, logger="tokengate"):
            # When twenty calls cannot be stored, each one runs
            assert [add(i, 1).get(timeout=10) for i in range(20)] == [i + 1 for i in range(20)]
        # Then the failures are counted, and logged once per interval, without tracebacks
        assert policy.stats()["store_errors"] == 20
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert 1 <= len(errors) <= 2 and not any(r.exc_info for r in errors)
        assert any("attempt to write a readonly database" in r.getMessage() for r in errors)
        # And when the database is writable again, calls are quarantined again
        writer_conn(policy).execute("PRAGMA query_only = OFF")
        with pytest.raises(TokenQuarantined):
            add(0, 0)
        assert policy.stats()["records_by_status"]["pending"] == 1


def test_a_full_database_admits_calls_and_keeps_what_it_stored(db: str) -> None:
    policy = QuarantinePolicy(db)
    with running(policy):
        policy.hold("qf.echo")
        with pytest.raises(TokenQuarantined) as first:
            echo(b"a" * 1000)
        conn = writer_conn(policy)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")  # the file cannot grow: SQLITE_FULL
        # When a large call cannot be stored, it runs
        assert echo(b"b" * 200_000).get(timeout=10) == b"b" * 200_000
        assert policy.stats()["store_errors"] == 1
        # Then the record acknowledged before is intact, and its payload still replays
        assert [r["id"] for r in policy.list()] == [first.value.quarantine_id]
        token = policy.release(first.value.quarantine_id)
        assert token.get(timeout=10) == b"a" * 1000
        conn.execute("PRAGMA max_page_count = 1073741823")
        with pytest.raises(TokenQuarantined):
            echo(b"c" * 200_000)


def test_a_corrupt_file_is_reported_once_calls_run_and_it_is_reopened_when_repaired(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "corrupt.sqlite3"
    path.write_bytes(b"this is not a database" * 1000)
    path.chmod(0o600)
    policy = QuarantinePolicy(str(path), retry_interval=0.05, log_interval=3600)
    with caplog.at_level(logging.ERROR, logger="tokengate"):
        with running(policy):
            policy.hold("qf.add")
            # When the file is not a database, calls run and the operator API says why
            assert [add(i, 0).get(timeout=10) for i in range(10)] == list(range(10))
            with pytest.raises(QuarantineStoreError):
                policy.list()
            assert policy.stats()["store_errors"] == 10
            opened = [r for r in caplog.records if "cannot open the quarantine database" in r.getMessage()]
            assert len(opened) == 1 and not opened[0].exc_info
            # And once the file is replaced by a good one, the writer reopens it by itself
            path.unlink()
            QuarantineStore(path).close()
            writer = policy._writer
            assert writer is not None
            for _ in range(400):  # bounded: the writer retries every 0.05 s
                if writer.store is not None:
                    break
                threading.Event().wait(0.05)
            with pytest.raises(TokenQuarantined):
                add(1, 1)


# -- the writer thread's lifecycle ----------------------------------------------------------------------


class FailingStart(Policy):
    name = "failing_start"

    def on_start(self, coordinator: OperationsCoordinator) -> None:
        raise RuntimeError("boom at start")


def test_the_writer_thread_is_joined_at_stop_and_after_a_failed_start(db: str) -> None:
    before = set(quarantine_threads())
    policy = QuarantinePolicy(db)
    with running(policy):
        assert len(set(quarantine_threads()) - before) == 1
    assert set(quarantine_threads()) == before

    coordinator = OperationsCoordinator(num_cores=1, workers_per_core=1,
                                        policies=[QuarantinePolicy(db), FailingStart()], name="qfail")
    with pytest.raises(RuntimeError, match="boom at start"):
        coordinator.start()
    assert set(quarantine_threads()) == before


def test_a_full_writer_queue_admits_the_call(db: str) -> None:
    store = SlowCommit(db)
    try:
        policy = QuarantinePolicy(store, queue_size=1, write_timeout=30)
        with running(policy):
            policy.hold("qf.add")
            results: list[Any] = []
            first = threading.Thread(target=lambda: results.append(_outcome(lambda: add(1, 0))))
            first.start()
            assert store.inside.wait(30)  # the writer is inside the first record's transaction
            second = threading.Thread(target=lambda: results.append(_outcome(lambda: add(2, 0))))
            second.start()  # fills the queue (one slot)
            assert _wait_until(lambda: policy._writer is not None and policy._writer.queued == 1)
            # When a third call finds the queue full, it runs at once
            assert add(3, 0).get(timeout=10) == 3
            store.proceed.set()
            first.join(30)
            second.join(30)
            assert sorted(results) == ["quarantined", "quarantined"]
    finally:
        store.proceed.set()
        store.close()


def _outcome(call: Any) -> str:
    try:
        token = call()
    except TokenQuarantined:
        return "quarantined"
    return f"ran {token.get(timeout=10)}"


def _wait_until(predicate: Any, attempts: int = 600) -> bool:
    for _ in range(attempts):  # bounded polling of another thread's progress, not a timing assertion
        if predicate():
            return True
        threading.Event().wait(0.05)
    return False
