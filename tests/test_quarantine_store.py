"""Tests for tokengate.quarantine.store."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tokengate.errors import ConfigurationError
from tokengate.quarantine.store import (
    QuarantineFullError,
    QuarantineRecord,
    QuarantineStateError,
    QuarantineStatus,
    QuarantineStore,
    QuarantineStoreError,
    summarize_args,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


@pytest.fixture
def store() -> Iterator[QuarantineStore]:
    s = QuarantineStore(":memory:")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def file_store(tmp_path: Path) -> Iterator[QuarantineStore]:
    s = QuarantineStore(tmp_path / "q.sqlite3")
    try:
        yield s
    finally:
        s.close()


def _add(
    s: QuarantineStore,
    op: str = "op.a",
    *,
    args: tuple[Any, ...] = (1, 2),
    kwargs: dict[str, Any] | None = None,
    trigger: str = "held_operation",
) -> QuarantineRecord:
    return s.add(op, "mod", "func", trigger, "held for review", args, kwargs or {"k": "v"})


def _mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Unreprable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class Plain:
    pass


# -- add / get ---------------------------------------------------------------


def test_add_and_get(store: QuarantineStore) -> None:
    rec = store.add(
        "reports.build", "app.reports", "Builder.run", "argument_size", "args too big",
        ([1, 2, 3], "abc"), {"name": 5},
    )
    assert len(rec.id) == 32 and int(rec.id, 16) >= 0
    assert rec.status is QuarantineStatus.PENDING
    assert rec.payload is not None and rec.payload_error is None
    assert rec.created_at == rec.updated_at
    assert rec.outcome_ok is None and rec.outcome_summary is None
    assert rec.args_summary == "0: list[len=3] [1, 2, 3], 1: str 'abc'"
    assert rec.kwargs_summary == "name: int 5"
    fetched = store.get(rec.id)
    # A summary read never loads the payload, but says how large it is and that it is kept
    assert fetched == replace(rec, payload=None)
    assert fetched.payload_kept and fetched.payload_size == len(rec.payload) > 0
    assert store.get("does-not-exist") is None
    assert store.load_payload(rec.id) == (([1, 2, 3], "abc"), {"name": 5})


def test_list_filters_and_paginates_newest_first(store: QuarantineStore) -> None:
    ids = [_add(store, "op.a" if i % 2 == 0 else "op.b").id for i in range(10)]
    newest_first = list(reversed(ids))

    assert [r.id for r in store.list()] == newest_first
    assert [r.id for r in store.list(limit=3)] == newest_first[:3]
    assert [r.id for r in store.list(limit=3, offset=3)] == newest_first[3:6]
    assert store.list(offset=100) == []
    assert [r.id for r in store.list(operation_type="op.a")] == [
        i for n, i in enumerate(newest_first) if ids.index(i) % 2 == 0
    ]
    store.mark_discarded(ids[0])
    store.mark_released(ids[1], True, "ok")
    assert [r.id for r in store.list(status=QuarantineStatus.DISCARDED)] == [ids[0]]
    assert [r.id for r in store.list(status="released")] == [ids[1]]
    assert [r.id for r in store.list(status="PENDING", operation_type="op.b")] == [
        i for i in newest_first if ids.index(i) % 2 == 1 and i != ids[1]
    ]

    assert store.count() == 10
    assert store.count(status="pending") == 8
    assert store.count(operation_type="op.a") == 5
    assert store.count(status=QuarantineStatus.DISCARDED, operation_type="op.a") == 1
    assert store.count(operation_type="missing") == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": -5},
        {"limit": True},
        {"limit": "10"},
        {"offset": -1},
        {"offset": 1.5},
        {"status": "bogus"},
        {"status": 3},
        {"operation_type": 7},
    ],
)
def test_bad_list_args_raise_configuration_error(store: QuarantineStore, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        store.list(**kwargs)


def test_unknown_status_error_names_valid_values(store: QuarantineStore) -> None:
    with pytest.raises(ConfigurationError, match="pending, released, discarded"):
        store.count(status="nope")
    assert isinstance(ConfigurationError("x"), ValueError)


def test_limit_bounds_are_inclusive(store: QuarantineStore) -> None:
    _add(store)
    assert len(store.list(limit=1)) == 1
    assert len(store.list(limit=1000)) == 1


# -- payloads -------------------------------------------------------------------


def test_unpicklable_args_still_create_record(store: QuarantineStore) -> None:
    rec = store.add("op", "mod", "f", "poison_call", "bad", (lambda x: x,), {"lock": threading.Lock()})
    assert rec.payload is None
    assert rec.payload_error
    assert rec.args_summary.startswith("0: function")
    assert rec.kwargs_summary.startswith("lock: ")
    assert store.get(rec.id) == rec
    with pytest.raises(ValueError, match="no stored payload"):
        store.load_payload(rec.id)

    lock_only = store.add("op", "mod", "f", "poison_call", "bad", (threading.Lock(),), {})
    assert lock_only.payload is None
    assert "lock" in (lock_only.payload_error or "").lower()
    assert store.count() == 2


def test_load_payload_unknown_id(store: QuarantineStore) -> None:
    with pytest.raises(KeyError):
        store.load_payload("missing")


def test_payload_size_limit(tmp_path: Path) -> None:
    with QuarantineStore(tmp_path / "small.sqlite3", max_payload_bytes=100) as s:
        rec = s.add("op", "m", "f", "argument_size", "big", (b"x" * 1000,), {})
        assert rec.payload is None
        assert "max_payload_bytes" in (rec.payload_error or "")
        small = s.add("op", "m", "f", "argument_size", "small", (1,), {})
        assert small.payload is not None


def test_bad_constructor_args() -> None:
    with pytest.raises(ConfigurationError):
        QuarantineStore(":memory:", max_payload_bytes=0)
    with pytest.raises(ConfigurationError):
        QuarantineStore(":memory:", timeout=-1)


def test_to_dict_is_json_ready(store: QuarantineStore) -> None:
    rec = _add(store, args=(b"\x00\xff",))
    data = rec.to_dict()
    assert "payload" not in data and "payload_b64" not in data
    assert data["has_payload"] is True
    assert data["status"] == "pending"
    json.dumps(data)
    with_payload = rec.to_dict(include_payload=True)
    assert isinstance(with_payload["payload_b64"], str)
    json.dumps(with_payload)
    bad = store.add("op", "m", "f", "poison_call", "r", (threading.Lock(),), {})
    assert bad.to_dict()["has_payload"] is False
    assert bad.to_dict(include_payload=True)["payload_b64"] is None


# -- transitions -------------------------------------------------------------------


def test_mark_released_and_discarded(store: QuarantineStore) -> None:
    a = _add(store)
    b = _add(store)
    released = store.mark_released(a.id, True, "returned 3")
    assert released.status is QuarantineStatus.RELEASED
    assert released.outcome_ok is True
    assert released.outcome_summary == "returned 3"
    assert released.updated_at >= a.updated_at
    assert store.get(a.id) == released

    failed = store.mark_released(_add(store).id, False, "ValueError: boom")
    assert failed.outcome_ok is False

    discarded = store.mark_discarded(b.id)
    assert discarded.status is QuarantineStatus.DISCARDED
    assert discarded.outcome_ok is None
    # payload is kept for audit
    assert store.load_payload(b.id) == ((1, 2), {"k": "v"})

    with pytest.raises(QuarantineStateError, match="not pending"):
        store.mark_discarded(a.id)
    with pytest.raises(QuarantineStateError, match="not pending"):
        store.mark_released(b.id, True, "x")
    assert issubclass(QuarantineStateError, ValueError)
    with pytest.raises(KeyError):
        store.mark_released("missing", True, "x")
    with pytest.raises(KeyError):
        store.mark_discarded("missing")
    # failed transitions changed nothing
    assert store.get(a.id) == released


def test_outcome_summary_is_capped(store: QuarantineStore) -> None:
    rec = store.mark_released(_add(store).id, True, "x" * 5000)
    assert rec.outcome_summary is not None
    assert len(rec.outcome_summary) == 2000
    assert rec.outcome_summary.endswith("…")


def test_stats(store: QuarantineStore) -> None:
    a = _add(store)
    _add(store)
    store.mark_discarded(a.id)
    stats = store.stats()
    assert stats == {
        "path": ":memory:",
        "total": 2,
        "by_status": {"pending": 1, "released": 0, "discarded": 1},
        "payloads_kept": 2,
        "payload_bytes": a.payload_size * 2,
        "limits": {"max_records": 10_000, "max_total_payload_bytes": 256 * 1024 * 1024,
                   "max_payload_bytes": 16 * 1024 * 1024},
    }
    json.dumps(stats)


# -- persistence and files -------------------------------------------------------


def test_persistence_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "persist.sqlite3"
    with QuarantineStore(path) as s:
        rec = s.add("op", "m", "f", "argument_size", "r", ({"a": [1, 2]}, 3.5), {"flag": True})
        gone = _add(s)
        s.mark_discarded(gone.id)
    with QuarantineStore(str(path)) as s:
        assert s.get(rec.id) == replace(rec, payload=None)
        assert s.load_payload(rec.id) == (({"a": [1, 2]}, 3.5), {"flag": True})
        assert s.count() == 2
        assert s.count(status="discarded") == 1
        assert s.stats()["path"] == str(path)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = [r[1] for r in conn.execute("PRAGMA index_list(quarantine)")]
        assert "quarantine_status_op_created" in indexes
    finally:
        conn.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite3"
    QuarantineStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(QuarantineStoreError, match="schema version 99"):
        QuarantineStore(path)


@posix_only
def test_new_file_is_owner_only(file_store: QuarantineStore, tmp_path: Path) -> None:
    _add(file_store)
    path = tmp_path / "q.sqlite3"
    assert _mode(path) == 0o600
    # WAL side files inherit the database's mode
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            assert _mode(side) == 0o600


@posix_only
def test_existing_loose_file_is_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "loose.sqlite3"
    path.touch()
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, logger="tokengate.quarantine.store"):
        with QuarantineStore(path) as s:
            _add(s)
    assert _mode(path) == 0o600
    assert any("tightening" in r.getMessage() for r in caplog.records)


@posix_only
def test_owner_only_file_is_not_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tight.sqlite3"
    QuarantineStore(path).close()
    with caplog.at_level(logging.WARNING, logger="tokengate.quarantine.store"):
        QuarantineStore(path).close()
    assert not [r for r in caplog.records if "tightening" in r.getMessage()]


def test_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(QuarantineStoreError):
        QuarantineStore(tmp_path / "no" / "such" / "dir" / "q.sqlite3")


# -- errors, lifecycle ---------------------------------------------------------------


def test_close_is_idempotent_and_blocks_use(tmp_path: Path) -> None:
    s = QuarantineStore(tmp_path / "c.sqlite3")
    assert not s.closed
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(QuarantineStoreError, match="closed"):
        s.count()
    with pytest.raises(QuarantineStoreError):
        _add(s)


def test_sqlite_error_in_add_is_wrapped_and_not_logged_per_call(
    store: QuarantineStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Break the schema underneath the store to provoke a sqlite3.Error.
    with store._lock:
        assert store._conn is not None
        store._conn.execute("DROP TABLE quarantine")
    with caplog.at_level(logging.ERROR, logger="tokengate.quarantine.store"):
        with pytest.raises(QuarantineStoreError) as info:
            _add(store)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert isinstance(info.value, RuntimeError)
    # The caller decides what to log (the quarantine policy logs once per interval)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # The store is still usable for reads that fail cleanly too.
    with pytest.raises(QuarantineStoreError):
        store.count()


def test_memory_store(store: QuarantineStore) -> None:
    rec = _add(store)
    assert store.path == ":memory:"
    assert store.get(rec.id) == replace(rec, payload=None)
    assert "memory" in repr(store)


def test_concurrent_adds(file_store: QuarantineStore) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            for i in range(50):
                _add(file_store, f"op.{n}", args=(n, i))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert file_store.count() == 400
    assert file_store.count(operation_type="op.3") == 50
    assert len({r.id for r in file_store.list(limit=1000)}) == 400


# -- summarize_args -------------------------------------------------------------


def test_summarize_args_formats() -> None:
    args_s, kwargs_s = summarize_args(([1, 2, 3], "abc", Plain()), {"name": 5})
    assert args_s == "0: list[len=3] [1, 2, 3], 1: str 'abc', 2: Plain"
    assert kwargs_s == "name: int 5"
    assert summarize_args((), {}) == ("", "")


def test_summarize_args_truncates_values() -> None:
    args_s, _ = summarize_args(("x" * 500, list(range(100))), {}, limit=1000)
    first, second = args_s.split(", 1: ")
    assert first.startswith("0: str[len=500] 'xxx")
    assert first.endswith("…'")
    assert len(first) < 80
    assert second.startswith("list[len=100] [0, 1, 2, 3, 4")
    assert len(second) < 60


def test_summarize_args_caps_total_length() -> None:
    args_s, kwargs_s = summarize_args(tuple(range(200)), {f"k{i}": i for i in range(200)}, limit=50)
    assert len(args_s) == 50 and args_s.endswith("…")
    assert len(kwargs_s) == 50 and kwargs_s.endswith("…")
    default_s, _ = summarize_args(tuple(range(500)), {})
    assert len(default_s) == 200


def test_summarize_args_never_raises() -> None:
    args_s, kwargs_s = summarize_args((Unreprable(),), {"bad": Unreprable()})
    assert args_s == "0: <unrepresentable Unreprable>"
    assert kwargs_s == "bad: <unrepresentable Unreprable>"

    class BadLen(list[int]):
        def __len__(self) -> int:
            raise RuntimeError("no len")

    summarize_args((BadLen([1]),), {})  # must not raise
    assert summarize_args((1,), {}, limit=0)[0] == "…"


@pytest.mark.skipif(not hasattr(sys, "set_int_max_str_digits"), reason="3.11+ int limit")
def test_summarize_huge_int() -> None:
    args_s, _ = summarize_args((10**5000,), {})
    assert args_s.startswith("0: int ")


# -- release claims across processes ------------------------------------------


def _live_process() -> Iterator[Any]:
    """A real other process on this host that stays alive until the generator is closed."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture
def other_process() -> Iterator[Any]:
    yield from _live_process()


def _identity_of(pid: int) -> str:
    import socket

    import psutil

    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.2f}"


def _set_claim(path: Path, id: str, owner: str | None) -> None:
    # What another process's claim() leaves in the file.
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE quarantine SET claimed_by = ?, claimed_at = 1.0 WHERE id = ?", (owner, id))


def test_claim_names_this_store_and_unclaim_ends_it(file_store: QuarantineStore) -> None:
    from tokengate.quarantine.store import process_identity

    rec = _add(file_store)
    claimed = file_store.claim(rec.id)
    assert claimed.claimed_by == file_store.claimant and claimed.claimed_at is not None
    assert file_store.claimant.startswith(process_identity() + "/")
    assert claimed.status is QuarantineStatus.PENDING
    assert claimed.to_dict()["claimed_by"] == file_store.claimant
    # a claim of this same store is taken again (the policy refuses its own doubles itself)
    assert file_store.claim(rec.id).claimed_by == file_store.claimant
    assert file_store.unclaim(rec.id) is True
    assert file_store.unclaim(rec.id) is False
    assert file_store.get(rec.id).claimed_by is None  # type: ignore[union-attr]


def test_a_live_claim_of_another_process_refuses_claim_release_and_discard(
        file_store: QuarantineStore, tmp_path: Path, other_process: Any) -> None:
    # Given a record claimed by another process that is still running
    rec = _add(file_store)
    owner = _identity_of(other_process.pid)
    _set_claim(tmp_path / "q.sqlite3", rec.id, owner)

    # Then this process can neither claim, mark released nor discard it
    with pytest.raises(QuarantineStateError,
                       match=f"being released by process {owner} \\(claimed at 1970-01-01T00:00:01Z\\)"):
        file_store.claim(rec.id)
    with pytest.raises(QuarantineStateError, match="claimed by process"):
        file_store.mark_released(rec.id, True, "ok")
    with pytest.raises(QuarantineStateError, match="cannot be discarded"):
        file_store.mark_discarded(rec.id)
    assert file_store.unclaim(rec.id) is False  # not ours to end
    assert file_store.get(rec.id).claimed_by == owner  # type: ignore[union-attr]

    # And a forced take-over moves the claim here (logged)
    assert file_store.claim(rec.id, take_over=True).claimed_by == file_store.claimant


def test_the_claim_of_a_process_that_exited_is_taken_over(file_store: QuarantineStore, tmp_path: Path) -> None:
    # Given a record claimed by a process that has since exited
    rec = _add(file_store)
    gen = _live_process()
    proc = next(gen)
    owner = _identity_of(proc.pid)
    gen.close()  # the process exits
    _set_claim(tmp_path / "q.sqlite3", rec.id, owner)

    # Then the stale claim does not block: discard and claim both work
    from tokengate.quarantine.store import claim_is_live

    assert not claim_is_live(owner)
    assert file_store.claim(rec.id).claimed_by == file_store.claimant


def test_two_stores_of_one_process_respect_each_others_claims(tmp_path: Path) -> None:
    # Given two stores on one file in this process (two coordinators sharing a quarantine database)
    first = QuarantineStore(tmp_path / "q.sqlite3")
    second = QuarantineStore(tmp_path / "q.sqlite3")
    try:
        rec = _add(first)
        first.claim(rec.id)
        # Then the second cannot release or discard what the first is releasing
        with pytest.raises(QuarantineStateError, match="being released by process"):
            second.claim(rec.id)
        with pytest.raises(QuarantineStateError, match="cannot be discarded"):
            second.mark_discarded(rec.id)
        # And once the first store is closed, its claim is stale and the second takes it
        first.close()
        assert second.claim(rec.id).claimed_by == second.claimant
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("owner", ["build-host-7:1:1700000000.00", "not a claim"])
def test_a_claim_from_another_host_or_unknown_format_counts_as_live(
        file_store: QuarantineStore, tmp_path: Path, owner: str) -> None:
    from tokengate.quarantine.store import claim_is_live

    rec = _add(file_store)
    _set_claim(tmp_path / "q.sqlite3", rec.id, owner)
    assert claim_is_live(owner)
    with pytest.raises(QuarantineStateError, match="being released by process"):
        file_store.claim(rec.id)


def test_the_same_pid_started_at_another_time_is_a_stale_claim() -> None:
    import socket

    from tokengate.quarantine.store import claim_is_live

    # pid reuse: our pid, but a start time that is not ours
    assert not claim_is_live(f"{socket.gethostname()}:{os.getpid()}:12.00")


def test_released_records_keep_who_released_them(file_store: QuarantineStore) -> None:
    rec = _add(file_store)
    file_store.claim(rec.id)
    done = file_store.mark_released(rec.id, True, "completed")
    assert done.status is QuarantineStatus.RELEASED and done.claimed_by == file_store.claimant
    with pytest.raises(QuarantineStateError, match="released, not pending"):
        file_store.claim(rec.id)
    discarded = file_store.mark_discarded(_add(file_store).id)
    assert discarded.claimed_by is None


def test_only_one_of_several_processes_wins_the_claim(file_store: QuarantineStore, tmp_path: Path) -> None:
    # Given four processes that open the same file and claim the same record at once
    import subprocess

    rec = _add(file_store)
    go = tmp_path / "go"
    script = (
        "import os, sys, time\n"
        "from tokengate.quarantine.store import QuarantineStore, QuarantineStateError\n"
        "s = QuarantineStore(sys.argv[1])\n"
        "while not os.path.exists(sys.argv[3]): time.sleep(0.001)\n"
        "try:\n"
        "    s.claim(sys.argv[2]); print('won', flush=True)\n"
        "except QuarantineStateError:\n"
        "    print('lost', flush=True)\n"
        "sys.stdin.read()  # stay alive so the winner's claim stays live\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "q.sqlite3"), rec.id, str(go)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        go.touch()
        # Then exactly one wins, and its claim refuses this process too
        answers = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
        assert sorted(answers) == ["lost", "lost", "lost", "won"]
        with pytest.raises(QuarantineStateError, match="being released by process"):
            file_store.claim(rec.id)
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=30)
            p.stdout.close()  # type: ignore[union-attr]


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    # Given a database written by schema version 1 (no claim columns) with one record
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE quarantine (id TEXT PRIMARY KEY, operation_type TEXT NOT NULL, func_module TEXT NOT NULL,"
            " func_qualname TEXT NOT NULL, trigger TEXT NOT NULL, reason TEXT NOT NULL, args_summary TEXT NOT NULL,"
            " kwargs_summary TEXT NOT NULL, payload BLOB, payload_error TEXT, created_at REAL NOT NULL,"
            " updated_at REAL NOT NULL, status TEXT NOT NULL CHECK (status IN ('pending', 'released', 'discarded')),"
            " outcome_summary TEXT, outcome_ok INTEGER)")
        conn.execute("INSERT INTO quarantine VALUES ('old1', 'op', 'm', 'f', 't', 'r', '()', '{}', NULL, 'x',"
                     " 1.0, 1.0, 'pending', NULL, NULL)")
        conn.execute("PRAGMA user_version = 1")
    os.chmod(path, 0o600)

    # When this version opens it
    with QuarantineStore(path) as s:
        # Then the record is intact, unclaimed, and can be claimed
        record = s.get("old1")
        assert record is not None and record.status is QuarantineStatus.PENDING and record.claimed_by is None
        assert s.claim("old1").claimed_by is not None
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3


def _v2_database(path: Path, payloads: dict[str, bytes | None]) -> None:
    """A database exactly as schema version 2 wrote it: payloads inline in the summary table."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE quarantine (id TEXT PRIMARY KEY, operation_type TEXT NOT NULL, func_module TEXT NOT NULL,"
            " func_qualname TEXT NOT NULL, trigger TEXT NOT NULL, reason TEXT NOT NULL, args_summary TEXT NOT NULL,"
            " kwargs_summary TEXT NOT NULL, payload BLOB, payload_error TEXT, created_at REAL NOT NULL,"
            " updated_at REAL NOT NULL, status TEXT NOT NULL CHECK (status IN ('pending', 'released', 'discarded')),"
            " outcome_summary TEXT, outcome_ok INTEGER, claimed_by TEXT, claimed_at REAL)")
        conn.execute("CREATE INDEX quarantine_status_op_created ON quarantine (status, operation_type, created_at)")
        for n, (rid, payload) in enumerate(payloads.items()):
            conn.execute("INSERT INTO quarantine VALUES (?, 'op', 'mod', 'func', 'held_operation', 'r', '0: int 1',"
                         " '', ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                         (rid, payload, None if payload else "TypeError: cannot pickle", float(n), float(n),
                          "released" if rid == "done" else "pending",
                          "completed: returned 3" if rid == "done" else None, 1 if rid == "done" else None))
        conn.execute("PRAGMA user_version = 2")
    os.chmod(path, 0o600)


def test_a_version_2_database_with_payloads_is_migrated_in_place(tmp_path: Path) -> None:
    # Given a version-2 file holding a large payload, a small one, a record without one, and a released record
    import pickle

    path = tmp_path / "v2.sqlite3"
    big = pickle.dumps(((b"x" * 200_000,), {}))
    small = pickle.dumps(((1, 2), {"k": "v"}))
    _v2_database(path, {"big": big, "small": small, "none": None, "done": small})

    # When this version opens it
    with QuarantineStore(path) as s:
        # Then every record is there, with its size, and summaries do not carry payload bytes
        by_id = {r.id: r for r in s.list(limit=10)}
        assert set(by_id) == {"big", "small", "none", "done"}
        assert by_id["big"].payload_size == len(big) and by_id["big"].payload_kept and by_id["big"].payload is None
        assert by_id["none"].payload_size == 0 and not by_id["none"].payload_kept
        assert by_id["none"].payload_error == "TypeError: cannot pickle"
        assert by_id["done"].status is QuarantineStatus.RELEASED and by_id["done"].outcome_ok is True
        # And the payloads still replay
        assert s.load_payload("big") == ((b"x" * 200_000,), {})
        assert s.load_payload("small") == ((1, 2), {"k": "v"})
        with pytest.raises(ValueError, match="cannot pickle"):
            s.load_payload("none")
        # And the store keeps working on the migrated file
        assert s.claim("small").claimed_by == s.claimant
        assert _add(s).payload_kept
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        columns = {r[1] for r in conn.execute("PRAGMA table_info(quarantine)")}
        assert "payload" not in columns and {"payload_size", "payload_kept"} <= columns
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(quarantine)")}
        assert {"quarantine_status_op_created", "quarantine_created"} <= indexes
    # And opening it again changes nothing
    with QuarantineStore(path) as s:
        assert s.count() == 5 and s.load_payload("big") == ((b"x" * 200_000,), {})


def test_summaries_never_read_the_payload_table(file_store: QuarantineStore) -> None:
    # Given a record with a payload
    rec = _add(file_store, args=(b"y" * 50_000,))
    # When the payload table is made unreadable to the read connection (a trace shows every statement)
    statements: list[str] = []
    assert file_store._rconn is not None
    file_store._rconn.set_trace_callback(statements.append)
    listed = file_store.list()
    file_store.get(rec.id)
    file_store.count()
    file_store.stats()
    # Then no summary statement touched the payload table
    assert listed[0].payload_size == rec.payload_size > 50_000
    assert statements and not [s for s in statements if "quarantine_payload" in s]
    file_store._rconn.set_trace_callback(None)


def test_a_failed_commit_is_rolled_back_and_the_connection_stays_usable(store: QuarantineStore) -> None:
    # Given a deferred foreign key, which fails at COMMIT and leaves the transaction open
    assert store._conn is not None
    conn = store._conn
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute("CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    # When a write's COMMIT fails
    with pytest.raises(QuarantineStoreError, match="FOREIGN KEY"):
        with store._write("test") as c:
            c.execute("INSERT INTO child VALUES (42)")
            c.execute("INSERT INTO quarantine_payload VALUES ('orphan', x'00')")
    # Then its changes are gone, no transaction is left open, and the next write works
    assert not conn.in_transaction
    assert conn.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM quarantine_payload").fetchone()[0] == 0
    assert _add(store).status is QuarantineStatus.PENDING


@pytest.mark.parametrize("kwargs", [
    {"max_records": 0}, {"max_records": True}, {"max_records": 1.5}, {"max_total_payload_bytes": -1},
    {"max_payload_bytes": 2000, "max_total_payload_bytes": 1000}, {"timeout": float("inf")}, {"timeout": True},
])
def test_bad_limits_are_refused_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        QuarantineStore(":memory:", **kwargs)


def test_retention_evicts_finished_records_first_and_never_a_pending_one() -> None:
    # Given room for three records
    with QuarantineStore(":memory:", max_records=3) as s:
        a, b, c = _add(s), _add(s), _add(s)
        s.mark_discarded(a.id)
        s.mark_released(b.id, True, "ok")
        # When a fourth arrives, the oldest finished record goes
        d = _add(s)
        assert {r.id for r in s.list()} == {b.id, c.id, d.id}
        # And the next one evicts the other finished record
        e = _add(s)
        assert {r.id for r in s.list()} == {c.id, d.id, e.id}
        # Then, with only pending records left, a new call is refused with a typed error, not stored
        with pytest.raises(QuarantineFullError, match="max_records=3"):
            _add(s)
        assert s.count() == 3 and s.count(status="pending") == 3
        # And discarding one makes room again
        s.mark_discarded(c.id)
        f = _add(s)
        assert {r.id for r in s.list()} == {d.id, e.id, f.id}


def test_retention_evicts_payloads_of_finished_then_oldest_pending_records() -> None:
    # Given room for ~3 payloads of 10 kB
    with QuarantineStore(":memory:", max_total_payload_bytes=35_000, max_payload_bytes=20_000) as s:
        def blob() -> QuarantineRecord:
            return _add(s, args=(b"z" * 10_000,))

        old_pending, finished, young = blob(), blob(), blob()
        s.mark_discarded(finished.id)
        # When a fourth payload goes over the cap, the finished record's payload goes first
        newest = blob()
        assert not s.get(finished.id).payload_kept  # type: ignore[union-attr]
        assert all(s.get(r.id).payload_kept for r in (old_pending, young, newest))  # type: ignore[union-attr]
        # And then the oldest pending record's payload; its summary stays, it says why
        latest = blob()
        evicted = s.get(old_pending.id)
        assert evicted is not None and not evicted.payload_kept and evicted.status is QuarantineStatus.PENDING
        assert "evicted by the retention policy" in (evicted.payload_error or "")
        assert evicted.args_summary.startswith("0: bytes[len=10000]") and evicted.payload_size > 10_000
        with pytest.raises(ValueError, match="evicted"):
            s.load_payload(old_pending.id)
        assert s.stats()["payload_bytes"] <= 35_000
        assert s.load_payload(latest.id)[0] == (b"z" * 10_000,)


def test_retention_never_evicts_the_payload_of_a_release_in_flight() -> None:
    with QuarantineStore(":memory:", max_total_payload_bytes=25_000, max_payload_bytes=20_000) as s:
        claimed = _add(s, args=(b"z" * 10_000,))
        s.claim(claimed.id)
        other = _add(s, args=(b"z" * 10_000,))
        _add(s, args=(b"z" * 10_000,))
        assert s.get(claimed.id).payload_kept  # type: ignore[union-attr]
        assert not s.get(other.id).payload_kept  # type: ignore[union-attr]


def test_a_payload_over_the_per_record_cap_keeps_its_summary_and_size(store: QuarantineStore) -> None:
    with QuarantineStore(":memory:", max_payload_bytes=1_000) as s:
        rec = s.add("op", "m", "f", "argument_spike", "big", (b"q" * 5_000,), {})
        stored = s.get(rec.id)
        assert stored is not None and not stored.payload_kept and stored.payload_size > 5_000
        assert stored.to_dict()["payload_kept"] is False and stored.to_dict()["payload_size"] > 5_000
        assert "max_payload_bytes" in (stored.payload_error or "")
