"""``python -m tokengate info`` and the coordinator's policy shortcuts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from tokengate import (
    ConfigurationError,
    OperationBlocked,
    OperationsCoordinator,
    QuarantinePolicy,
    ReputationPolicy,
    TokenQuarantined,
    task_token_guard,
)
from tokengate.__main__ import main, render_info


def test_info_prints_topology_and_routing_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--num-cores", "3", "--workers-per-core", "2"]) == 0
    out = capsys.readouterr().out
    assert "worker domains ('cores') 3 x 2 workers = 6 threads" in out
    assert "heavy    1 -> 2 -> 3" in out and "light    3" in out
    assert "sticky_anchor" in out  # every policy's tags are declared


def test_info_json_and_as_a_module() -> None:
    done = subprocess.run([sys.executable, "-m", "tokengate", "info", "--json", "--num-cores", "8"],
                          capture_output=True, text=True, timeout=60, check=True)
    data = json.loads(done.stdout)
    assert data["routing"]["allowed"]["light"] == [8, 7, 6, 5, 4, 3]
    assert "medium" in render_info(2, 4, 1)


@task_token_guard(operation_type="always_fails", tags={"weight": "light"})
def always_fails(i: int) -> None:
    raise RuntimeError(f"nope {i}")


def test_unblock_hold_and_unhold_shortcuts(run: Any) -> None:
    async def main_() -> None:
        policies = [ReputationPolicy(auto_block=True, block_min_attempts=3, block_window=3),
                    QuarantinePolicy(":memory:")]
        async with OperationsCoordinator(policies=policies, num_cores=1, workers_per_core=1) as c:
            await asyncio.gather(*[always_fails(i) for i in range(3)], return_exceptions=True)
            with pytest.raises(OperationBlocked):
                always_fails(99)
            assert c.unblock("always_fails") is True
            c.hold("always_fails")
            with pytest.raises(TokenQuarantined) as info:
                always_fails(100)
            assert info.value.quarantine_id
            c.unhold("always_fails")
            with pytest.raises(RuntimeError):
                await always_fails(101)

    run(main_())


def test_shortcuts_without_the_policy_say_how_to_install_it(run: Any) -> None:
    async def main_() -> None:
        async with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1) as c:
            with pytest.raises(ConfigurationError, match="ReputationPolicy"):
                c.unblock("x")
            with pytest.raises(ConfigurationError, match="QuarantinePolicy"):
                c.hold("x")

    run(main_())
