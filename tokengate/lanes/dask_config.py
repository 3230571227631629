"""The Dask lane's settings, read before any lane exists: the dependency, the scheduler's address, the defaults.

Used by the decorator (a ``lane: "dask"`` function needs ``distributed``:
:func:`require_distributed`), by the coordinator when it builds the lane
(:func:`address_from`, :func:`distributed_available`, ``DEFAULT_INFLIGHT``),
and by :mod:`tokengate.lanes.dask` (the embedded cluster's
``LOCAL_RESOURCES``). Importing this module never imports Dask.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import ConfigurationError

__all__ = [
    "ADDRESS_ENV",
    "DEFAULT_INFLIGHT",
    "EXTRA_HINT",
    "LOCAL_RESOURCES",
    "address_from",
    "distributed_available",
    "require_distributed",
]

#: The environment variable naming the scheduler when no ``dask_address`` is given.
ADDRESS_ENV = "TOKENGATE_DASK_ADDRESS"
#: How to install the lane's dependency.
EXTRA_HINT = "pip install 'tokengate[dask]'"
#: Calls in flight on the cluster per domain when ``dask_inflight`` is not given (slots are cheap: no thread).
DEFAULT_INFLIGHT = 64
#: Resources the embedded cluster declares on every worker (one task of each class per worker thread).
LOCAL_RESOURCES = {"heavy": 1, "medium": 1, "light": 1}


def distributed_available() -> bool:
    """True if ``distributed`` can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("distributed") is not None
    except (ImportError, ValueError):
        return False


def require_distributed(what: str) -> None:
    """Raise ConfigurationError naming the extra to install when ``distributed`` is missing."""
    if not distributed_available():
        raise ConfigurationError(
            f"{what} needs Dask distributed, which is not installed; install the extra: {EXTRA_HINT}")


def address_from(option: str | None) -> str | None:
    """The scheduler address: the option, else ``TOKENGATE_DASK_ADDRESS``, else None (embedded cluster).

    Raises:
        ConfigurationError: an address that is not a non-empty string.
    """
    if option is None:
        option = os.environ.get(ADDRESS_ENV) or None
    if option is not None and (not isinstance(option, str) or not option.strip()):
        raise ConfigurationError(f"dask_address must be a scheduler address like 'tcp://host:8786', got {option!r}")
    return None if option is None else option.strip()
