"""Lane views of a ``coordinator.stats()`` snapshot, for the admin routes, ``/events`` and metrics.

``stats()`` reports the thread lane's workers under ``cores`` (rows without a
``lane`` key) and every other lane under ``lanes[name]["cores"]`` (rows with
``lane`` and, on the process lane, ``process``: the worker process's
figures). These helpers give every worker row its lane, list the workers of
all lanes in one list, and tell which lane ran a history record (by the
worker that ran it, whose id is unique across lanes).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from tokengate import OperationsCoordinator

__all__ = ["THREAD_LANE", "PROCESS_LANE", "DASK_LANE", "LIVE_PROCESS_STATES", "label_thread_workers", "lane_workers",
           "worker_lanes", "process_counts", "with_lanes", "operation_lanes"]

THREAD_LANE = "thread"
PROCESS_LANE = "process"
DASK_LANE = "dask"
#: States of a worker process that is up and can take a call.
LIVE_PROCESS_STATES = frozenset({"idle", "busy"})


def label_thread_workers(stats: dict[str, Any]) -> dict[str, Any]:
    """Give the thread lane's worker rows of *stats* their ``lane`` (in place; a fresh snapshot); return it."""
    for core in stats.get("cores", ()):
        for worker in core.get("workers", ()):
            worker.setdefault("lane", THREAD_LANE)
    return stats


def lane_workers(stats: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every worker row of every lane, threads first, each with its ``core_id`` and ``lane``."""
    for core in stats.get("cores", ()):
        for worker in core.get("workers", ()):
            yield {**worker, "core_id": core["core_id"], "lane": worker.get("lane", THREAD_LANE)}
    for name, lane in sorted(stats.get("lanes", {}).items()):
        for core in lane.get("cores", ()):
            for worker in core.get("workers", ()):
                yield {**worker, "core_id": core["core_id"], "lane": worker.get("lane", name)}


def worker_lanes(stats: Mapping[str, Any]) -> dict[str, str]:
    """worker_id → lane, over every lane."""
    return {str(w["worker_id"]): str(w["lane"]) for w in lane_workers(stats)}


def process_counts(stats: Mapping[str, Any]) -> tuple[int, int] | None:
    """(worker processes, those up) of the process lane, or None without one."""
    lane = stats.get("lanes", {}).get(PROCESS_LANE)
    if lane is None:
        return None
    total = up = 0
    for core in lane.get("cores", ()):
        for worker in core.get("workers", ()):
            total += 1
            process = worker.get("process") or {}
            if process.get("state") in LIVE_PROCESS_STATES:
                up += 1
    return total, up


def with_lanes(records: list[dict[str, Any]], lanes: Mapping[str, str]) -> list[dict[str, Any]]:
    """History records (dicts) with the ``lane`` of the worker that ran each (None: it never ran on one)."""
    for record in records:
        worker = record.get("worker_id")
        record["lane"] = None if worker is None else lanes.get(str(worker))
    return records


#: history() takes a limit; the coordinator's history_size bounds what it returns.
_WHOLE_HISTORY = 1 << 30


def operation_lanes(coordinator: OperationsCoordinator, lanes: Mapping[str, str]) -> dict[str, str]:
    """operation_type → the lane its most recent call in the execution history ran on.

    *lanes* is :func:`worker_lanes` of a snapshot. Operations with no record
    in the (bounded) history, or whose records never reached a worker, are
    absent. Cost: one pass over the history (``history_size`` records).
    """
    found: dict[str, str] = {}
    for record in coordinator.history(_WHOLE_HISTORY):  # newest first
        if record.operation_type in found or record.worker_id is None:
            continue
        lane = lanes.get(record.worker_id)
        if lane is not None:
            found[record.operation_type] = lane
    return found
