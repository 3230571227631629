"""A FastAPI app that shows every TokenGate feature; run it with ``python -m example_app`` (or ``make run``).

See ``example_app/README.md`` for a curl walkthrough of every endpoint and
every admin route.
"""

from .app import create_app

__all__ = ["create_app"]
