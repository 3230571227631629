"""A FastAPI app that shows every TokenGate feature; run it with ``python -m example_app`` (or ``make run``).

See ``example_app/README.md`` for a curl walkthrough of every endpoint and
every admin route.

``create_app`` is imported on first access, not with the package: the worker
processes of the process lane import ``example_app.work`` to find their
functions, and must not pay for importing FastAPI (about a second here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
