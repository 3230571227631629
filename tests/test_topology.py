"""Routing tables for 1, 2, 3, 8 and 16 domains, owners, reserves, and topology detection."""

from __future__ import annotations

import pytest

from tokengate import detect_topology, routing_table


@pytest.mark.parametrize(
    "n,heavy,medium,light",
    [
        (1, (1,), (1,), (1,)),
        (2, (1, 2), (2,), (2,)),
        (3, (1, 2, 3), (2, 3), (3,)),
        (8, tuple(range(1, 9)), tuple(range(2, 9)), (8, 7, 6, 5, 4, 3)),
        (16, tuple(range(1, 17)), tuple(range(2, 17)), tuple(range(16, 2, -1))),
    ],
)
def test_allowed_cores_in_preference_order(n: int, heavy: tuple, medium: tuple, light: tuple) -> None:  # type: ignore[type-arg]
    table = routing_table(n, 4, 1)
    # Heavy starts at 1 and spills forward; light starts at the last core and spills backward.
    assert table.allowed == {"heavy": heavy, "medium": medium, "light": light}


def test_owners_and_reserve_on_two_cores() -> None:
    table = routing_table(2, 4, 1)
    assert table.owners == {1: frozenset({"heavy"}), 2: frozenset({"medium", "light"})}
    # Heavy spilling onto core 2 may not take its first (reserved) worker.
    assert list(table.usable_workers("heavy", 2)) == [1, 2, 3]
    assert list(table.usable_workers("light", 2)) == [0, 1, 2, 3]
    assert table.to_dict()["max_workers"] == {"heavy": 7, "medium": 4, "light": 4}


def test_one_core_everything_shares_core_one() -> None:
    table = routing_table(1, 4, 1)
    assert table.owners[1] == frozenset({"heavy", "medium", "light"})
    assert list(table.usable_workers("heavy", 1)) == [0, 1, 2, 3]


def test_eight_cores_medium_spill_keeps_light_reserve() -> None:
    table = routing_table(8, 4, 2)
    assert "light" in table.owners[5] and "medium" not in table.owners[5]
    assert list(table.usable_workers("medium", 5)) == [2, 3]
    assert list(table.usable_workers("medium", 2)) == [0, 1, 2, 3]


def test_detect_topology_reads_usable_cpus() -> None:
    topo = detect_topology()
    assert topo.usable_cpus >= 1
    assert topo.logical_cpus >= topo.usable_cpus
    assert len(topo.cpu_set) == topo.usable_cpus
