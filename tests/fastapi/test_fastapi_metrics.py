"""TokengateCollector: families read at scrape time, own registries, low cardinality, weak reference."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

from tokengate import OperationsCoordinator, task_token_guard
from tokengate_fastapi import TokengateCollector


@task_token_guard(operation_type="metrics.square", tags={"weight": "light"})
def square(x: int) -> int:
    return x * x


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_collector_reads_stats_at_scrape_time() -> None:
    coordinator = OperationsCoordinator(num_cores=2, workers_per_core=1, policies=[], name="tgtest-m")
    registry = CollectorRegistry()
    registry.register(TokengateCollector(coordinator))
    with coordinator:
        # Given: nothing ran yet
        before = _samples(registry)
        assert before[("tokengate_up", (("coordinator", "tgtest-m"),))] == 1.0
        assert before[("tokengate_settled_total", (("coordinator", "tgtest-m"), ("state", "completed")))] == 0.0
        # When: two calls complete
        assert square(2).get(10) == 4 and square(3).get(10) == 9
        after = _samples(registry)
    # Then: the next scrape shows them, per state, per core and weight
    assert after[("tokengate_settled_total", (("coordinator", "tgtest-m"), ("state", "completed")))] == 2.0
    assert after[("tokengate_accepted_total", (("coordinator", "tgtest-m"),))] == 2.0
    routed = sum(v for (name, labels), v in after.items() if name == "tokengate_routed_total"
                 and ("weight", "light") in labels)
    assert routed == 2.0
    assert ("tokengate_core_queue_depth", (("coordinator", "tgtest-m"), ("core", "2"))) in after
    assert ("tokengate_run_time_seconds", (("coordinator", "tgtest-m"), ("quantile", "0.5"))) in after
    # low cardinality: only these label names, never an id
    label_names = {k for (_, labels) in after for k, _ in labels}
    assert label_names <= {"coordinator", "core", "weight", "state", "quantile"}
    assert _samples(registry)[("tokengate_up", (("coordinator", "tgtest-m"),))] == 0.0  # stopped


def test_duplicate_registration_is_refused_and_namespace_separates() -> None:
    a = OperationsCoordinator(num_cores=1, workers_per_core=1, policies=[], name="tgtest-a")
    b = OperationsCoordinator(num_cores=1, workers_per_core=1, policies=[], name="tgtest-b")
    registry = CollectorRegistry()
    registry.register(TokengateCollector(a))
    with pytest.raises(DuplicateTimeseries):
        registry.register(TokengateCollector(b))
    registry.register(TokengateCollector(b, namespace="other"))
    names = {name for name, _ in _samples(registry)}
    assert "tokengate_inflight" in names and "other_inflight" in names


def test_collector_does_not_keep_the_coordinator_alive() -> None:
    coordinator: Any = OperationsCoordinator(num_cores=1, workers_per_core=1, policies=[], name="tgtest-weak")
    collector = TokengateCollector(coordinator)
    del coordinator
    gc.collect()
    assert list(collector.collect()) == []
