"""Machine topology and the weight-class routing table.

"Cores" here are *worker domains* numbered from 1: each owns
``workers_per_core`` threads with bounded mailboxes. They are not CPU pins:
the OS schedules the threads, and under the GIL pure-Python work does not run
in parallel (see the README's performance notes).

Routing table (N domains)::

    heavy   may use every domain, prefers 1 and spills forward   1, 2, ..., N
    medium  domains 2 and up (1 if N == 1), spills forward        2, 3, ..., N
    light   domains 3 and up, starts at the last, spills back     N, N-1, ..., 3
            (N == 2: domain 2; N == 1: domain 1)

Each domain has *owners*: domain 1 is heavy's, domain 2 medium's (and light's
when N == 2), domains 3..N light's; with N == 1 every class owns domain 1. A
class that spills onto a domain it does not own may not use that domain's
first ``reserve`` workers: that is the bulkhead that keeps a flood of slow
heavy calls from starving light ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from .tags import WEIGHTS

__all__ = ["Topology", "detect_topology", "RoutingTable", "routing_table"]


@dataclass(frozen=True)
class Topology:
    """What the process may use: logical CPUs in its affinity mask, physical cores."""

    logical_cpus: int
    usable_cpus: int
    physical_cores: int | None
    cpu_set: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "logical_cpus": self.logical_cpus,
            "usable_cpus": self.usable_cpus,
            "physical_cores": self.physical_cores,
            "cpu_set": list(self.cpu_set),
        }


def detect_topology() -> Topology:
    """Read the logical CPUs this process may run on (its affinity mask) via psutil."""
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False)
    cpu_set: tuple[int, ...]
    try:
        cpu_set = tuple(sorted(psutil.Process().cpu_affinity() or ()))
    except (AttributeError, NotImplementedError, psutil.Error, OSError):
        cpu_set = ()
    if not cpu_set:
        try:
            cpu_set = tuple(sorted(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            cpu_set = tuple(range(logical))
    return Topology(logical, max(1, len(cpu_set)), physical, cpu_set)


@dataclass(frozen=True)
class RoutingTable:
    """Which domains each weight class may use, in preference order, and who owns each domain."""

    num_cores: int
    workers_per_core: int
    reserve: int
    allowed: dict[str, tuple[int, ...]]
    owners: dict[int, frozenset[str]]

    def usable_workers(self, weight: str, core: int) -> range:
        """Worker indexes (0-based) on *core* that class *weight* may use, before convergence."""
        low = 0 if weight in self.owners[core] else min(self.reserve, self.workers_per_core)
        return range(low, self.workers_per_core)

    def to_dict(self) -> dict[str, object]:
        return {
            "num_cores": self.num_cores,
            "workers_per_core": self.workers_per_core,
            "reserve": self.reserve,
            "allowed": {w: list(c) for w, c in self.allowed.items()},
            "owners": {str(c): sorted(o) for c, o in self.owners.items()},
            "max_workers": {
                w: sum(len(self.usable_workers(w, c)) for c in cores) for w, cores in self.allowed.items()
            },
        }


def routing_table(num_cores: int, workers_per_core: int, reserve: int) -> RoutingTable:
    """Build the routing table for *num_cores* domains (see the module docstring)."""
    n = num_cores
    heavy = tuple(range(1, n + 1))
    medium = tuple(range(2, n + 1)) if n >= 2 else (1,)
    if n >= 3:
        light = tuple(range(n, 2, -1))
    elif n == 2:
        light = (2,)
    else:
        light = (1,)
    owners: dict[int, set[str]] = {c: set() for c in range(1, n + 1)}
    if n == 1:
        owners[1] = set(WEIGHTS)
    else:
        owners[1].add("heavy")
        owners[2].add("medium")
        for c in light:
            owners[c].add("light")
    return RoutingTable(
        num_cores=n,
        workers_per_core=workers_per_core,
        reserve=reserve,
        allowed={"heavy": heavy, "medium": medium, "light": light},
        owners={c: frozenset(o) for c, o in owners.items()},
    )
