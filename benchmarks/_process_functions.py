"""Trivial functions for the process benchmarks, in an importable module (worker processes find them by name)."""

from __future__ import annotations


def inc(x: int) -> int:
    return x + 1
