"""Declared tags: what ``task_token_guard(tags={...})`` accepts, and who owns each key.

Every subsystem declares the tag keys it understands with :func:`declare_tag`
when its module is imported (the core declares ``weight`` and ``timeout``).
The decorator validates a function's tags against these declarations at
decoration time, so a typo fails at import with a message that names the key
and suggests the closest one, instead of being silently ignored at run time.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .errors import ConfigurationError

__all__ = ["TagSpec", "TagCheck", "declare_tag", "declared_tags", "validate_tags", "check_tags", "WEIGHTS", "LANES",
           "parse_weight", "parse_lane"]

#: A tag's check against the function it decorates: ``check(func, value, tags)`` with the
#: normalized value and all the normalized tags; raises ConfigurationError when they do not fit.
TagCheck = Callable[[Callable[..., Any], Any, Mapping[str, Any]], None]

WEIGHTS = ("heavy", "medium", "light")
#: How a routed call runs: on a worker thread, in a worker process, or on a Dask cluster.
LANES = ("thread", "process", "dask")


@dataclass(frozen=True)
class TagSpec:
    """One declared tag key.

    ``parse`` receives the raw value and returns the normalized one, or raises
    ``ConfigurationError`` with a message that names the value and the fix.
    ``check``, if given, runs at decoration after every tag was parsed, with the
    function, this tag's normalized value and all the normalized tags: for what
    a value alone cannot say (a parameter name that must exist in the
    function's signature, two tags that contradict each other). It raises
    ``ConfigurationError`` too, and must not call the function.
    """

    name: str
    owner: str
    parse: Callable[[Any], Any]
    doc: str
    check: TagCheck | None = None


_DECLARED: dict[str, TagSpec] = {}


def declare_tag(name: str, owner: str, parse: Callable[[Any], Any], doc: str, *,
                check: TagCheck | None = None) -> TagSpec:
    """Declare a tag key. Idempotent for the same owner; a clash between owners is a bug.

    *check* (optional) checks a parsed value against the decorated function:
    see :class:`TagSpec`.
    """
    existing = _DECLARED.get(name)
    if existing is not None and existing.owner != owner:
        raise ConfigurationError(f"tag {name!r} is already declared by {existing.owner!r}")
    spec = TagSpec(name, owner, parse, doc, check)
    _DECLARED[name] = spec
    return spec


def declared_tags() -> Mapping[str, TagSpec]:
    """All declared tag keys, by name."""
    return dict(_DECLARED)


def validate_tags(tags: Mapping[str, Any] | None, *, where: str) -> dict[str, Any]:
    """Return normalized tags; raise ConfigurationError on an unknown key or bad value."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise ConfigurationError(f"{where}: tags must be a dict, got {type(tags).__name__} {tags!r}")
    out: dict[str, Any] = {}
    for key, value in tags.items():
        if not isinstance(key, str):
            raise ConfigurationError(f"{where}: tag keys must be strings, got {key!r}")
        spec = _DECLARED.get(key)
        if spec is None:
            close = difflib.get_close_matches(key, list(_DECLARED), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(_DECLARED))
            raise ConfigurationError(f"{where}: unknown tag {key!r}{hint} (known tags: {known})")
        try:
            out[key] = spec.parse(value)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: tag {key!r}: {exc}") from None
    return out


def check_tags(func: Callable[..., Any], tags: Mapping[str, Any], *, where: str) -> None:
    """Run the ``check`` of every tag in *tags* (normalized by :func:`validate_tags`) against *func*.

    Raises:
        ConfigurationError: the first check that fails, prefixed with *where* and the tag's name.
    """
    for key, value in tags.items():
        spec = _DECLARED.get(key)
        if spec is None or spec.check is None:
            continue
        try:
            spec.check(func, value, tags)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: tag {key!r}: {exc}") from None


def parse_weight(value: Any) -> str:
    """``heavy`` | ``medium`` | ``light``, case-insensitive."""
    if not isinstance(value, str):
        raise ConfigurationError(f"weight must be a string, one of {', '.join(WEIGHTS)}; got {value!r}")
    normalized = value.strip().lower()
    if normalized not in WEIGHTS:
        raise ConfigurationError(f"unknown weight {value!r}; use one of {', '.join(WEIGHTS)}")
    return normalized


def parse_lane(value: Any) -> str:
    """``thread`` | ``process`` | ``dask``, case-insensitive."""
    if not isinstance(value, str) or value.strip().lower() not in LANES:
        raise ConfigurationError(f"unknown lane {value!r}; use one of {', '.join(LANES)}")
    return value.strip().lower()


def parse_process_pool(value: Any) -> bool:
    """The seeds' ``process_pool: True``: the same as ``lane: "process"``."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"process_pool must be True or False, got {value!r}; or use lane='process'")
    return value


def parse_seconds(value: Any) -> float:
    """A positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"expected a number of seconds, got {type(value).__name__} {value!r}")
    seconds = float(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigurationError(f"expected a positive, finite number of seconds, got {value!r}")
    return seconds


declare_tag("weight", "core", parse_weight, "weight class: heavy | medium | light (default: inferred from complexity)")
declare_tag("timeout", "core", parse_seconds, "seconds before the token settles as TIMEOUT")
declare_tag("lane", "core", parse_lane, "how the call runs: thread (default) | process | dask")
declare_tag("process_pool", "core", parse_process_pool, "True: the same as lane='process' (the seeds' name)")
