"""Fixtures for the tokengate_fastapi tests: app builders, a lifespan-running client, fake policies.

This directory has no ``__init__.py`` on purpose: as a package it would be
named ``fastapi`` (``tests/`` is not a package) and shadow the real FastAPI.
Test module names are therefore prefixed ``test_fastapi_`` to stay unique, and
shared helpers are fixtures (never ``import conftest``: there are two).

Fast tests run the app in-process: ``asgi_lifespan.LifespanManager`` runs
the lifespan, ``httpx.ASGITransport`` carries requests (no sockets, no
threads besides the coordinator's workers). Async tests use anyio's pytest
plugin pinned to asyncio.
"""

from __future__ import annotations

import builtins
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from tokengate import OperationsCoordinator, Policy, TaskToken, task_token_guard
from tokengate.quarantine.store import QuarantineStateError
from tokengate_fastapi import admin_router, tokengate_lifespan

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
PREFIX = "/tokengate"


@task_token_guard(operation_type="fx.square", tags={"weight": "light"})
def square(x: int) -> int:
    """Trivial light work (what FakeQuarantine.release re-runs)."""
    return x * x


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_env_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests decide the admin token explicitly; an exported one must not leak in."""
    monkeypatch.delenv("TOKENGATE_ADMIN_TOKEN", raising=False)


@pytest.fixture
def admin_token() -> str:
    """The token make_app configures."""
    return ADMIN_TOKEN


@pytest.fixture
def auth() -> dict[str, str]:
    """Headers carrying the right admin token."""
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event test functions block on; always set at teardown so no worker stays blocked."""
    event = threading.Event()
    yield event
    event.set()


def _coordinator_options(**overrides: Any) -> dict[str, Any]:
    """Small, fast coordinators: one core, two workers, no default policies, no worker processes.

    Tests of the process lane pass ``process_workers=N`` (the lifespan then starts them warm).
    """
    options: dict[str, Any] = {"num_cores": 1, "workers_per_core": 2, "policies": [], "name": "tgtest",
                               "process_workers": 0}
    options.update(overrides)
    return options


@pytest.fixture
def make_app() -> Callable[..., FastAPI]:
    """Build an app with the tokengate lifespan and the admin router under ``/tokengate``.

    Keywords: ``router`` (admin_router options; token defaults to ADMIN_TOKEN),
    ``drain_timeout``, and any coordinator option.
    """

    def make(*, router: dict[str, Any] | None = None, drain_timeout: float = 2.0, **options: Any) -> FastAPI:
        app = FastAPI(lifespan=tokengate_lifespan(drain_timeout=drain_timeout, **_coordinator_options(**options)))
        router_options = {"token": ADMIN_TOKEN, "sse_interval": 0.01, **(router or {})}
        app.include_router(admin_router(**router_options), prefix=PREFIX)
        return app

    return make


@pytest.fixture
def serve() -> Callable[[FastAPI], Any]:
    """``async with serve(app) as client``: run the lifespan and yield an httpx client for the app."""

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
        async with LifespanManager(app, startup_timeout=10, shutdown_timeout=15) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=10) as client:
                yield client

    return run


# -- fake policies with exactly the API the admin router relies on -------------------------


class FakeReputation(Policy):
    """Reputation rows and blocks kept in a dict (no hooks)."""

    name = "reputation"

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self._blocked: set[str] = set()

    def reputation(self, operation_type: str | None = None) -> list[dict[str, Any]]:
        rows = [dict(r) for op, r in self.rows.items() if operation_type in (None, op)]
        return rows

    def block(self, operation_type: str) -> bool:
        self._blocked.add(operation_type)
        return True

    def unblock(self, operation_type: str) -> bool:
        was = operation_type in self._blocked
        self._blocked.discard(operation_type)
        return was

    def blocked(self) -> list[str]:
        return sorted(self._blocked)


class FakeQuarantine(Policy):
    """Quarantine records in a dict; ``release`` submits ``square`` to the coordinator."""

    name = "quarantine"

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self._held: set[str] = set()
        self._coordinator: OperationsCoordinator | None = None
        self.release_calls: list[tuple[str, bool]] = []

    def on_start(self, coordinator: OperationsCoordinator) -> None:
        self._coordinator = coordinator

    def add(self, id: str, operation_type: str = "fx.square", status: str = "pending") -> None:
        self.records[id] = {"id": id, "operation_type": operation_type, "status": status, "trigger": "spike",
                            "reason": "test", "args_summary": "(3,)", "kwargs_summary": "{}", "created_at": 1.0}

    def list(self, status: str | None = None, operation_type: str | None = None, limit: int = 50,
             offset: int = 0) -> list[dict[str, Any]]:
        rows = [r for r in self.records.values()
                if status in (None, r["status"]) and operation_type in (None, r["operation_type"])]
        return [dict(r) for r in rows[offset:offset + limit]]

    def get(self, id: str) -> dict[str, Any] | None:
        record = self.records.get(id)
        return None if record is None else dict(record)

    def release(self, id: str, *, force: bool = False) -> TaskToken[Any]:
        self.release_calls.append((id, force))
        record = self.records[id]  # KeyError for an unknown id, like the real policy
        if record["status"] != "pending":
            raise QuarantineStateError(f"quarantined call {id} is {record['status']}, not pending")
        assert self._coordinator is not None
        token = self._coordinator.submit(square, (3,), {})
        record["status"] = "released"
        return token

    def discard(self, id: str) -> dict[str, Any]:
        record = self.records[id]
        if record["status"] != "pending":
            raise QuarantineStateError(f"quarantined call {id} is {record['status']}, not pending")
        record["status"] = "discarded"
        return dict(record)

    def hold(self, operation_type: str) -> None:
        self._held.add(operation_type)

    def unhold(self, operation_type: str) -> None:
        self._held.discard(operation_type)

    def held_operations(self) -> builtins.list[str]:
        return sorted(self._held)


@pytest.fixture
def fake_reputation() -> FakeReputation:
    return FakeReputation()


@pytest.fixture
def fake_quarantine() -> FakeQuarantine:
    return FakeQuarantine()
