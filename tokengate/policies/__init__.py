"""Safety and locality policies plugged into the token lifecycle (see :mod:`tokengate.policy`)."""

from __future__ import annotations

from ..policy import Policy

__all__ = ["default_policies"]


def default_policies() -> list[Policy]:
    """The policies a coordinator installs when ``policies=None``, in order."""
    return []
