"""The fleet file (tokengate/fleet_store.py) on a fake clock: membership, death, retired counters, commands."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path
from typing import Iterator

import pytest

from tokengate.errors import ConfigurationError
from tokengate.fleet import Fleet, fleet_dir_from_env
from tokengate.fleet_store import FILE_NAME, DesiredState, FleetStore, FleetStoreError, MemberInfo


class Clock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[FleetStore]:
    s = FleetStore(tmp_path / "fleet", clock=clock)
    yield s
    s.close()


def _join(store: FleetStore, pid: int = 100, fleet: str = "app") -> str:
    return store.register(fleet, pid=pid, host="h", process_started_at=1.0, version="0.1.0")


def test_the_file_is_owner_only_in_wal_mode(tmp_path: Path, store: FleetStore) -> None:
    path = tmp_path / "fleet" / FILE_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "fleet").st_mode) == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_register_gives_unique_short_ids_and_lists_members_oldest_first(store: FleetStore, clock: Clock) -> None:
    a = _join(store, 1)
    clock.now += 1
    b = _join(store, 2)
    assert a != b and len(a) == 6 and int(a, 16) >= 0
    members = store.members("app")
    assert [m.member_id for m in members] == [a, b] and [m.pid for m in members] == [1, 2]
    assert store.members("other") == []  # fleets are separated by coordinator name


def test_a_member_that_stops_beating_is_marked_gone_and_its_counters_retire(store: FleetStore, clock: Clock) -> None:
    a, b = _join(store, 1), _join(store, 2)
    store.heartbeat(a, snapshot='{"x": 1}', counters={"accepted": 5, "completed": 4})
    store.heartbeat(b, snapshot='{"x": 2}', counters={"accepted": 7, "completed": 7})
    clock.now += 2.9
    store.heartbeat(a)
    assert store.sweep("app", stale_after=3.0, forget_after=60) == []
    clock.now += 0.2  # b's heartbeat is now 3.1 s old
    gone = store.sweep("app", stale_after=3.0, forget_after=60)
    assert [m.member_id for m in gone] == [b] and gone[0].state == "gone" and "no heartbeat" in str(gone[0].reason)
    assert [m.member_id for m in store.members("app")] == [a]
    assert store.retired("app") == {"accepted": 7.0, "completed": 7.0}
    assert b not in store.snapshots("app", {})  # its figures left the view
    assert store.sweep("app", stale_after=3.0, forget_after=60) == []  # marked once, folded once
    assert store.retired("app") == {"accepted": 7.0, "completed": 7.0}


def test_a_dead_pid_is_gone_at_once_and_old_records_are_forgotten(store: FleetStore, clock: Clock) -> None:
    a, b = _join(store, 1), _join(store, 2)
    gone = store.sweep("app", stale_after=3.0, forget_after=60, is_dead=lambda m: m.pid == 2)
    assert [m.member_id for m in gone] == [b] and "is gone" in str(gone[0].reason)
    seq = store.issue("app", a, "pause")
    store.ack(seq, a, ok=True, detail="applied")
    assert [m.member_id for m in store.members("app", states=("gone",))] == [b]
    clock.now += 61
    store.heartbeat(a)
    store.sweep("app", stale_after=3.0, forget_after=60)
    assert store.members("app", states=("gone", "left")) == []
    assert store.commands_after("app", 0) == [] and store.acks([seq]) == {seq: {}}
    assert store.desired("app").paused  # the standing state outlives its command


def test_leaving_retires_the_final_counters(store: FleetStore) -> None:
    a = _join(store)
    store.heartbeat(a, snapshot="{}", counters={"accepted": 3})
    store.leave(a, counters={"accepted": 4, "completed": 4})
    store.leave(a, counters={"accepted": 99})  # idempotent
    assert store.retired("app") == {"accepted": 4.0, "completed": 4.0}
    [left] = store.members("app", states=("left",))
    assert left.reason == "stopped" and left.departed_at is not None


def test_a_member_marked_gone_by_mistake_comes_back_without_counting_twice(store: FleetStore, clock: Clock) -> None:
    a, b = _join(store, 1), _join(store, 2)
    store.heartbeat(b, snapshot="{}", counters={"accepted": 10})
    clock.now += 5
    store.heartbeat(a)
    store.sweep("app", stale_after=3.0, forget_after=60)
    assert store.retired("app") == {"accepted": 10.0}
    assert store.heartbeat(b, snapshot="{}", counters={"accepted": 12})  # it was only suspended
    assert store.retired("app") == {"accepted": 0.0}
    assert {m.member_id for m in store.members("app")} == {a, b}
    store.leave(b)
    assert store.retired("app") == {"accepted": 12.0}


def test_a_forgotten_member_registers_again_under_its_id(store: FleetStore, clock: Clock) -> None:
    a = _join(store)
    clock.now += 100
    store.sweep("app", stale_after=3.0, forget_after=10)  # gone, then forgotten at the next sweep
    clock.now += 11
    store.sweep("app", stale_after=3.0, forget_after=10)
    assert store.heartbeat(a) is False
    assert store.register("app", pid=1, host="h", process_started_at=1.0, version="v", member_id=a) == a
    with pytest.raises(FleetStoreError):
        store.register("app", pid=1, host="h", process_started_at=1.0, version="v", member_id=a)


def test_commands_desired_state_and_acks(store: FleetStore) -> None:
    a, b = _join(store, 1), _join(store, 2)
    assert store.join_state("app") == (DesiredState(), 0)
    s1 = store.issue("app", a, "pause")
    s2 = store.issue("app", a, "hold", operation="op.x")
    s3 = store.issue("app", a, "pause_operation", operation="op.y")
    s4 = store.issue("app", a, "get_token", args={"token_id": "7"}, target=b)
    s5 = store.issue("app", a, "drain", args={"wait": False})
    desired, last = store.join_state("app")
    assert last == s5 and (desired.paused, desired.draining) == (True, True)
    assert desired.held_operations == ("op.x",) and desired.paused_operations == ("op.y",)
    commands = store.commands_after("app", s1)
    assert [c.seq for c in commands] == [s2, s3, s4, s5]
    assert commands[2].target == b and commands[2].args == {"token_id": "7"} and commands[0].operation == "op.x"
    store.issue("app", a, "resume")
    store.issue("app", a, "unhold", operation="op.x")
    store.issue("app", a, "resume_operation", operation="op.y")
    assert store.desired("app") == DesiredState()
    store.ack(s1, b, ok=True, detail="applied", result={"paused": True})
    store.ack(s1, b, ok=False, detail="late duplicate")  # the first answer wins
    assert store.acks([s1, s2])[s1][b].result == {"paused": True} and store.acks([s1, s2])[s2] == {}
    with pytest.raises(ConfigurationError, match="unknown fleet action"):
        store.issue("app", a, "reboot")


def test_scrape_reads_members_snapshots_and_retired_together(store: FleetStore) -> None:
    a, b = _join(store, 1), _join(store, 2)
    store.heartbeat(a, snapshot='{"n": 1}', counters={"accepted": 1})
    store.leave(b, counters={"accepted": 5})
    members, snaps, retired = store.scrape("app")
    assert [m.member_id for m in members] == [a] and snaps[a][1] == '{"n": 1}' and retired == {"accepted": 5.0}
    assert store.snapshots("app", {a: snaps[a][0]}) == {}  # unchanged since it was known


def test_bad_directories_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(FleetStoreError, match="fleet directory"):
        FleetStore(tmp_path / "file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / FILE_NAME).write_bytes(b"not a database" * 100)
    with pytest.raises(FleetStoreError, match="cannot use"):
        FleetStore(tmp_path / "d")
    for bad in ("", "  ", b"/tmp", 3, "a\x00b"):
        with pytest.raises(ConfigurationError, match="fleet_dir"):
            Fleet(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        Fleet(tmp_path, heartbeat_interval=0)
    with pytest.raises(ConfigurationError, match="missed_heartbeats"):
        Fleet(tmp_path, missed_heartbeats=0)


def test_fleet_dir_from_env() -> None:
    assert fleet_dir_from_env({}) is None and fleet_dir_from_env({"TOKENGATE_FLEET_DIR": " "}) is None
    assert fleet_dir_from_env({"TOKENGATE_FLEET_DIR": "/srv/fleet"}) == Path("/srv/fleet")


def test_member_info_round_trips() -> None:
    info = MemberInfo("abc123", "app", 1, "h", 1.0, "v", 2.0, 3.0, "live")
    assert MemberInfo(**info.to_dict()) == info


def test_the_first_live_member_starts_a_new_fleet_and_later_ones_inherit(store: FleetStore) -> None:
    a = _join(store, 1)
    store.issue("app", a, "drain")
    b = _join(store, 2)  # joins a live member: inherits the drain
    assert store.desired("app").draining
    store.leave(a)
    store.leave(b)
    _join(store, 3)  # the whole server was restarted: it must not come up drained
    assert store.desired("app") == DesiredState()


def test_a_member_whose_thread_beats_but_loop_does_not_publish_is_shown_stuck() -> None:
    from tokengate.fleet import FleetView, member_row

    member = MemberInfo("abc123", "app", 1, "h", 1.0, "v", joined_at=0.0, heartbeat_at=99.5, state="live")
    fresh = FleetView(fleet="app", members=(member,), snapshots={"abc123": (99.0, {})})
    assert member_row(member, fresh, now=100.0, heartbeat_interval=1.0)["loop_stuck"] is False
    old = FleetView(fleet="app", members=(member,), snapshots={"abc123": (95.0, {})})
    row = member_row(member, old, now=100.0, heartbeat_interval=1.0)
    assert row["loop_stuck"] is True and row["snapshot_age"] == 5.0 and row["heartbeat_age"] == 0.5
    silent = MemberInfo(**{**member.to_dict(), "heartbeat_at": 90.0})  # dead, not stuck: it will be marked gone
    assert member_row(silent, old, now=100.0, heartbeat_interval=1.0)["loop_stuck"] is False
