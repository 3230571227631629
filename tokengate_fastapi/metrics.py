"""``TokengateCollector``: Prometheus metrics read from ``coordinator.stats()`` at scrape time.

Nothing is counted on the hot path: each scrape takes one stats snapshot and
turns it into metric families. The admin router's ``GET /metrics`` serves it
from a registry of its own. To expose it through an existing endpoint
(``prometheus_client.make_asgi_app()``, prometheus-fastapi-instrumentator),
register it in that registry inside the lifespan::

    REGISTRY.register(TokengateCollector(coordinator))

Labels are few and bounded: ``coordinator`` (its name), ``weight``,
``core``, ``state``, ``quantile`` and ``worker`` (a process-lane worker's id:
as many as ``process_workers``); never a token id or an operation name.

Note:
    The collector reads the live coordinator of *this* process, so
    ``PROMETHEUS_MULTIPROC_DIR`` multiprocess mode cannot aggregate it (its
    files hold values a process wrote, not a collector read at scrape time).
    With several server workers, give them a fleet (``fleet_dir`` /
    ``TOKENGATE_FLEET_DIR``): the admin router's ``/metrics`` then answers
    for the whole fleet with :func:`fleet_families` (every family gets a
    ``member`` label, plus ``tokengate_fleet_*`` totals), whichever process
    is scraped. Two coordinators in one registry need different
    ``namespace`` values.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from tokengate import OperationsCoordinator, TERMINAL_STATES
from tokengate.fleet import MONOTONIC_COUNTS, FleetView

from ._lanes import DASK_LANE, LIVE_PROCESS_STATES, PROCESS_LANE

__all__ = ["TokengateCollector", "FixedCollector", "fleet_families"]

_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.95", "p95"), ("0.99", "p99"))
_STATES = sorted(s.value for s in TERMINAL_STATES)
#: Every state a worker process handle can be in (tokengate.lanes.ProcessState), reported even at 0.
_PROCESS_STATES = ("new", "starting", "idle", "busy", "crashed", "terminated", "closed")


class TokengateCollector:
    """A prometheus-client collector for one coordinator.

    Families (``tokengate`` is the default namespace):

    * gauges: ``tokengate_up``, ``_draining``, ``_paused``, ``_inflight``,
      ``_waiting``, ``_admitted``, ``_executing``, ``_held``,
      ``_pending{weight}``, ``_core_queue_depth{core}``,
      ``_core_busy_workers{core}``, ``_core_active_workers{core}``,
      ``_throughput_per_second``, ``_queue_wait_seconds{quantile}`` and
      ``_run_time_seconds{quantile}`` (percentiles over the most recent
      calls, plus ``quantile="1"`` for the window's maximum);
    * counters: ``tokengate_accepted_total``, ``_settled_total{state}``,
      ``_rejected_at_submit_total``, ``_retries_total``,
      ``_routed_total{core,weight}``;
    * the process lane (families without samples when the coordinator has
      none): gauges ``tokengate_process_workers_live`` (worker processes up),
      ``_process_workers{state}`` (worker processes by state: new, starting,
      idle, busy, crashed, terminated, closed), ``_process_rss_bytes{worker}``;
      counters ``_process_restarts_total``, ``_process_crashes_total``,
      ``_process_terminations_total``, ``_process_recycles_total`` (summed
      over the lane's workers; each worker keeps its figures for its whole
      life, over its replacements, so the sums only grow);
    * the Dask lane (families without samples without one): gauges
      ``tokengate_dask_connected`` (1/0), ``_dask_workers``,
      ``_dask_inflight{weight}``; counters ``_dask_submitted_total``,
      ``_dask_lost_total``, ``_dask_crashed_total``,
      ``_dask_refused_at_submit_total``, ``_dask_refused_unavailable_total``,
      ``_dask_reconnects_total``.

    Holds the coordinator weakly: a collector left in a global registry
    never keeps a stopped coordinator alive (it then reports nothing).
    Thread: ``collect()`` is called by whatever thread scrapes; it only reads.
    """

    def __init__(self, coordinator: OperationsCoordinator, *, namespace: str = "tokengate") -> None:
        self._coordinator = weakref.ref(coordinator)
        self.namespace = namespace

    def describe(self) -> Iterable[Metric]:
        """The families without samples (lets a registry refuse duplicate names at register time)."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """One snapshot of the coordinator as metric families."""
        coordinator = self._coordinator()
        if coordinator is None:
            return []
        return list(self._families(coordinator.stats()))

    def _families(self, stats: Mapping[str, Any] | None) -> Iterator[Metric]:
        ns = self.namespace
        name = "" if stats is None else str(stats["name"])
        counts: Mapping[str, Any] = {} if stats is None else stats["counts"]
        cores: list[Mapping[str, Any]] = [] if stats is None else stats["cores"]

        def gauge(metric: str, doc: str, value: float | None) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{ns}_{metric}", doc, labels=["coordinator"])
            if stats is not None and value is not None:
                family.add_metric([name], float(value))
            return family

        def counter(metric: str, doc: str, value: float | None) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{ns}_{metric}", doc, labels=["coordinator"])
            if stats is not None and value is not None:
                family.add_metric([name], float(value))
            return family

        yield gauge("up", "1 while the coordinator is running.",
                    None if stats is None else float(stats["phase"] == "running"))
        yield gauge("draining", "1 while drain() keeps the gate closed.",
                    None if stats is None else float(bool(stats["draining"])))
        yield gauge("paused", "1 while global admission is paused.",
                    None if stats is None else float(bool(stats["paused"])))
        yield gauge("inflight", "Calls accepted and not yet settled.", counts.get("inflight"))
        yield gauge("waiting", "Calls waiting for a mailbox (pending, held or paused).", counts.get("waiting"))
        yield gauge("admitted", "Calls sitting in worker mailboxes.", counts.get("admitted"))
        yield gauge("executing", "Calls running on a worker thread now.", counts.get("executing"))
        yield gauge("held", "Calls held because their operation is paused.",
                    None if stats is None else sum(stats["held"].values()))
        yield gauge("throughput_per_second", "Settled calls per second over the last 10 s.",
                    None if stats is None else stats["throughput_per_s"])

        pending = GaugeMetricFamily(f"{ns}_pending", "Calls waiting in each weight class's pending queue.",
                                    labels=["coordinator", "weight"])
        if stats is not None:
            for weight, value in sorted(stats["pending"].items()):
                pending.add_metric([name, weight], float(value))
        yield pending

        for metric, key, doc in (
            ("core_queue_depth", "queue_depth", "Calls in the mailboxes of a worker domain."),
            ("core_busy_workers", "busy_workers", "Workers of a domain running a call now."),
            ("core_active_workers", "active_workers", "Workers of a domain taking new calls."),
        ):
            family = GaugeMetricFamily(f"{ns}_{metric}", doc, labels=["coordinator", "core"])
            for core in cores:
                family.add_metric([name, str(core["core_id"])], float(core[key]))
            yield family

        for metric, key, doc in (
            ("queue_wait_seconds", "queue_wait", "Creation to start on a worker, recent calls (quantile 1 = max)."),
            ("run_time_seconds", "run_time", "Run time on the worker, recent calls (quantile 1 = max)."),
        ):
            family = GaugeMetricFamily(f"{ns}_{metric}", doc, labels=["coordinator", "quantile"])
            if stats is not None:
                summary: Mapping[str, Any] = stats[key]
                for quantile, field in (*_QUANTILES, ("1", "max")):
                    value = summary.get(field)
                    if value is not None:
                        family.add_metric([name, quantile], float(value))
            yield family

        yield counter("accepted", "Calls accepted since start.", counts.get("accepted"))
        yield counter("rejected_at_submit", "Calls refused before acceptance.", counts.get("rejected_at_submit"))
        yield counter("retries", "Attempts retried by a policy.", counts.get("retries"))
        settled = CounterMetricFamily(f"{ns}_settled", "Calls settled, by terminal state.",
                                      labels=["coordinator", "state"])
        if stats is not None:
            for state in _STATES:
                settled.add_metric([name, state], float(counts.get(state, 0)))
        yield settled
        routed = CounterMetricFamily(f"{ns}_routed", "Calls placed in a domain's mailboxes, by weight class.",
                                     labels=["coordinator", "core", "weight"])
        for core in cores:
            for weight, value in sorted(core["routed"].items()):
                routed.add_metric([name, str(core["core_id"]), weight], float(value))
        yield routed
        yield from self._process_families(stats, name)
        yield from self._dask_families(stats, name)

    def _dask_families(self, stats: Mapping[str, Any] | None, name: str) -> Iterator[Metric]:
        """The Dask lane's cluster: families without samples when the coordinator has no Dask lane."""
        ns = self.namespace
        lane: Mapping[str, Any] | None = None if stats is None else stats.get("lanes", {}).get(DASK_LANE)
        cluster: Mapping[str, Any] | None = None if lane is None else lane.get("cluster")
        connected = GaugeMetricFamily(f"{ns}_dask_connected",
                                      "1 while the Dask lane is connected to its scheduler, else 0.",
                                      labels=["coordinator"])
        workers = GaugeMetricFamily(f"{ns}_dask_workers", "Workers of the Dask lane's cluster.",
                                    labels=["coordinator"])
        inflight = GaugeMetricFamily(f"{ns}_dask_inflight", "Dask-lane calls on the cluster now, by weight class.",
                                     labels=["coordinator", "weight"])
        if cluster is not None:
            connected.add_metric([name], 1.0 if cluster.get("state") == "connected" else 0.0)
            workers.add_metric([name], float(len(cluster.get("workers") or ())))
            for weight, value in sorted((cluster.get("inflight_by_class") or {}).items()):
                inflight.add_metric([name, str(weight)], float(value))
        yield connected
        yield workers
        yield inflight
        for metric, key, doc in (
            ("dask_submitted", "submitted", "Dask-lane calls submitted to the cluster."),
            ("dask_lost", "lost", "Dask-lane calls on the cluster when the connection to the scheduler was lost."),
            ("dask_crashed", "crashed", "Dask-lane calls whose Dask worker died (KilledWorker, after Dask's retries)."),
            ("dask_refused_at_submit", "refused_at_submit",
             "Dask-lane calls refused at submit (ClusterDown) while the scheduler was lost."),
            ("dask_refused_unavailable", "refused_unavailable",
             "Accepted Dask-lane calls settled ClusterUnavailable because there was no connection."),
            ("dask_reconnects", "reconnects", "Times the Dask lane reconnected to its scheduler."),
        ):
            family = CounterMetricFamily(f"{ns}_{metric}", doc, labels=["coordinator"])
            if cluster is not None:
                family.add_metric([name], float(cluster.get(key) or 0))
            yield family

    def _process_families(self, stats: Mapping[str, Any] | None, name: str) -> Iterator[Metric]:
        ns = self.namespace
        lane: Mapping[str, Any] | None = None if stats is None else stats.get("lanes", {}).get(PROCESS_LANE)
        rows: list[Mapping[str, Any]] = [] if lane is None else [
            {"worker_id": w["worker_id"], **(w.get("process") or {})} for core in lane["cores"] for w in core["workers"]]
        present = lane is not None

        live = GaugeMetricFamily(f"{ns}_process_workers_live", "Worker processes of the process lane that are up.",
                                 labels=["coordinator"])
        by_state = GaugeMetricFamily(f"{ns}_process_workers", "Worker processes of the process lane, by state.",
                                     labels=["coordinator", "state"])
        rss = GaugeMetricFamily(f"{ns}_process_rss_bytes", "Resident memory of each worker process.",
                                labels=["coordinator", "worker"])
        if present:
            live.add_metric([name], float(sum(1 for r in rows if r.get("state") in LIVE_PROCESS_STATES)))
            states = {state: 0 for state in _PROCESS_STATES}
            for row in rows:
                state = str(row.get("state", "new"))
                states[state] = states.get(state, 0) + 1
            for state, count in sorted(states.items()):
                by_state.add_metric([name, state], float(count))
            for row in rows:
                if row.get("rss_bytes") is not None:
                    rss.add_metric([name, str(row["worker_id"])], float(row["rss_bytes"]))
        yield live
        yield by_state
        yield rss
        for metric, key, doc in (
            ("process_restarts", "restarts", "Worker processes replaced, of any cause."),
            ("process_crashes", "crashes", "Worker processes that died on their own (segfault, os._exit, OOM kill)."),
            ("process_terminations", "terminations",
             "Worker processes ended on purpose (kill or timeout of a running call, stop)."),
            ("process_recycles", "recycles",
             "Worker processes replaced between calls (max_calls_per_process, max_process_rss)."),
        ):
            family = CounterMetricFamily(f"{ns}_{metric}", doc, labels=["coordinator"])
            if present:
                family.add_metric([name], float(sum(int(r.get(key) or 0) for r in rows)))
            yield family


class FixedCollector:
    """A collector that returns families computed beforehand (one fleet scrape)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        """The families given at construction."""
        return self._families


def fleet_families(view: FleetView, *, now: float, namespace: str = "tokengate") -> list[Metric]:
    """Metric families for a whole fleet, from one consistent read of the fleet file (``Fleet.scrape()``).

    Every :class:`TokengateCollector` family, once per live member, with a
    ``member`` label added (each member as of its last published snapshot,
    at most about one heartbeat old), plus:

    * ``tokengate_fleet_members`` (gauge): live members;
    * ``tokengate_fleet_snapshot_age_seconds{member}`` (gauge): how old each
      member's figures are;
    * ``tokengate_fleet_accepted_total``, ``_fleet_settled_total{state}``,
      ``_fleet_retries_total``, ``_fleet_rejected_at_submit_total``
      (counters): live members plus every member that left or died, so they
      never go backwards when a process goes away (a member killed without
      leaving loses at most its last heartbeat's worth of counts).

    Whichever process is scraped answers from the same file, so the
    counters stay monotonic across scrapes that reach different processes.
    """
    ns = namespace
    per_member: dict[str, Metric] = {}
    collector = TokengateCollector.__new__(TokengateCollector)
    collector.namespace = ns
    counts: dict[str, float] = {key: float(view.retired.get(key, 0.0)) for key in MONOTONIC_COUNTS}
    ages = GaugeMetricFamily(f"{ns}_fleet_snapshot_age_seconds", "Seconds since each member published its figures.",
                             labels=["coordinator", "member"])
    for member in view.members:
        entry = view.snapshots.get(member.member_id)
        stats = entry[1].get("stats") if entry is not None and isinstance(entry[1], Mapping) else None
        if not isinstance(stats, Mapping):
            continue
        ages.add_metric([view.fleet, member.member_id], max(0.0, now - entry[0]))  # type: ignore[index]
        for key in MONOTONIC_COUNTS:
            counts[key] += float((stats.get("counts") or {}).get(key) or 0)
        for family in collector._families(stats):
            target = per_member.get(family.name)
            if target is None:
                target = per_member[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            target.samples += [Sample(s.name, {**s.labels, "member": member.member_id}, s.value, s.timestamp,
                                      s.exemplar) for s in family.samples]
    fleet: list[Metric] = [ages]
    live = GaugeMetricFamily(f"{ns}_fleet_members", "Live members of the fleet (server processes).",
                             labels=["coordinator"])
    live.add_metric([view.fleet], float(len(view.members)))
    fleet.append(live)
    for metric, key, doc in (
        ("fleet_accepted", "accepted", "Calls accepted by every member, departed ones included."),
        ("fleet_retries", "retries", "Attempts retried by every member, departed ones included."),
        ("fleet_rejected_at_submit", "rejected_at_submit",
         "Calls refused before acceptance by every member, departed ones included."),
    ):
        family = CounterMetricFamily(f"{ns}_{metric}", doc, labels=["coordinator"])
        family.add_metric([view.fleet], counts[key])
        fleet.append(family)
    settled = CounterMetricFamily(f"{ns}_fleet_settled", "Calls settled by every member, by terminal state, "
                                  "departed members included.", labels=["coordinator", "state"])
    for state in _STATES:
        settled.add_metric([view.fleet, state], counts.get(state, 0.0))
    fleet.append(settled)
    return [*per_member.values(), *fleet]
