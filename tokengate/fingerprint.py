"""Argument fingerprints for sticky routing.

A call's routing key is ``(anchor, fingerprint(args, kwargs))``.  A fingerprint
is a *stable, hashable routing key*, not an equality witness: calls with equal
keys go to the same worker domain, nothing more.  It never raises.

What the key of each kind of value is (STANDARD policy):

============================  ====================================================
Value                         Key
============================  ====================================================
int, str, bytes, bool, None,  the value itself (so ``True`` and ``1`` share a key;
float, complex                NaN becomes ``("float", "nan")`` to route together)
Decimal, Fraction, datetime,  the value itself
date, time, timedelta, UUID,
range, pathlib paths
tuple                         tuple of the items' keys (untagged)
list                          ``("list", items)``, so ``[1, 2]`` and ``(1, 2)`` differ
dict, defaultdict, Counter    ``(tag, pairs)``, pairs sorted by the repr of their
                              key: insertion order does not matter
OrderedDict                   ``("OrderedDict", pairs in order)``
set, frozenset                ``("set", frozenset of keys)``
bytearray, memoryview, array  tag, layout and bytes (memoryview and array: bytes
                              only up to 4096, else their size)
deque, ChainMap, slice        tag plus their parts
numpy ndarray                 ``("ndarray", shape, dtype)`` -- NOT the contents
numpy scalar                  the key of its ``.item()``
pandas DataFrame, Series      shape or length, dtypes, name -- NOT the contents
torch Tensor                  ``("Tensor", shape, dtype, device type)``
other hashable objects        the object itself (enum members, frozen dataclasses)
unhashable dataclass          ``("dataclass", qualname, field keys)``
other ``shape`` + ``dtype``   ``(qualname, shape key, dtype)``
other Mapping, list, set      tagged keys of their items, plus the qualname
other sized iterables         ``(qualname, len)``
anything else, or on error    ``(qualname, id(obj))`` -- identity
============================  ====================================================

Nesting deeper than 32 levels becomes ``("<deep>", type name)``; a container
met again inside itself becomes ``("<cycle>", type name)``.  A value with more
than 10,000 containers or unknown objects (say, a list shared by reference
at every level of a deep tree) is summarised as ``("<large>", qualname, len)``,
which keeps every key cheap to hash.

FAST keeps only the builtin and stdlib rows (exact types) and keys everything
else by identity, so two distinct but equal custom objects route independently.
NONE ignores the arguments: the key is the anchor alone.  numpy, pandas and
torch are never imported here; their types are recognised only once the
application has imported them.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import datetime
import decimal
import enum
import fractions
import hashlib
import operator
import pathlib
import sys
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sized
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

from tokengate.errors import ConfigurationError

__all__ = [
    "DigestPolicy", "HashPolicy", "args_fingerprint", "digest",
    "fast_make_hashable", "freeze", "make_hashable", "routing_key",
]  # fmt: skip

_E = TypeVar("_E", bound=enum.Enum)


def _parse_enum(cls: type[_E], value: object) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        wanted = value.strip().lower()
        for member in cls:
            if member.value == wanted:
                return member
    valid = ", ".join(repr(m.value) for m in cls)
    raise ConfigurationError(f"invalid {cls.__name__} {value!r}; expected one of: {valid}")


class HashPolicy(str, enum.Enum):
    """How much of a call's arguments goes into its routing key."""

    NONE = "none"  #: no argument hashing: the key is the anchor alone
    FAST = "fast"  #: builtins and stdlib only; other objects by identity
    STANDARD = "standard"  #: full fingerprint (the default)
    FULL = "full"  #: same as STANDARD, reserved for deeper hashing

    @classmethod
    def parse(cls, value: HashPolicy | str) -> HashPolicy:
        """Return the policy for an enum member or a case-insensitive name."""
        return _parse_enum(cls, value)


class DigestPolicy(str, enum.Enum):
    """Which hash :func:`digest` uses and how long its hex output is."""

    FULL = "full"  #: SHA-256, 64 hex chars (the default)
    SHORT = "short"  #: SHA-256 truncated to 16 hex chars
    FAST = "fast"  #: BLAKE2s with an 8-byte digest, 16 hex chars
    MINIMAL = "minimal"  #: SHA-256 truncated to 8 hex chars

    @classmethod
    def parse(cls, value: DigestPolicy | str) -> DigestPolicy:
        """Return the policy for an enum member or a case-insensitive name."""
        return _parse_enum(cls, value)


def digest(material: str, policy: DigestPolicy = DigestPolicy.FULL) -> str:
    """Return a hex digest of ``material`` according to ``policy``."""
    policy = DigestPolicy.parse(policy)
    data = material.encode("utf-8", "surrogatepass")  # lone surrogates must not raise
    if policy is DigestPolicy.FAST:
        return hashlib.blake2s(data, digest_size=8).hexdigest()
    full = hashlib.sha256(data).hexdigest()
    if policy is DigestPolicy.SHORT:
        return full[:16]
    if policy is DigestPolicy.MINIMAL:
        return full[:8]
    return full


# --------------------------------------------------------------------------
# The walker: one per fingerprinted value, carrying depth, path and a budget.

_MAX_DEPTH = 32
_MAX_NODES = 10_000  # bounds the key's size, even for DAGs that share sub-lists
_SMALL_BYTES = 4096
_CACHE_LIMIT = 1024  # resolved third-party/unknown types cached per table

_Handler = Callable[[Any, "_Walker"], Hashable]


def _qualname(tp: type) -> str:
    try:
        name = tp.__qualname__
        return name if isinstance(name, str) else "?"
    except Exception:
        return "?"


def _identity_key(obj: object) -> Hashable:
    return (_qualname(type(obj)), id(obj))


def _safe_repr(obj: object) -> str:
    try:
        return repr(obj)
    except Exception:
        return f"<{_qualname(type(obj))}>"


class _Walker:
    """Converts one value; ``path`` holds the ids of the containers being
    converted (alive, so ids are unique) to cut cycles."""

    __slots__ = ("table", "resolve", "depth", "nodes", "path")

    def __init__(self, table: dict[type, _Handler], resolve: Callable[[type], _Handler]):
        self.table = table
        self.resolve = resolve
        self.depth = 0
        self.nodes = 0
        self.path: set[int] = set()

    def __call__(self, obj: object) -> Hashable:
        try:  # everything, even the type lookup: a metaclass __hash__ may raise
            tp = type(obj)
            handler = self.table.get(tp)
            if handler in _LEAVES:  # no children: skip the bookkeeping below
                return handler(obj, self)
            self.nodes += 1
            if self.nodes > _MAX_NODES:
                return "<large>"  # discarded: the caller summarises the whole value
            if self.depth >= _MAX_DEPTH:
                return ("<deep>", _qualname(tp))
            if id(obj) in self.path:
                return ("<cycle>", _qualname(tp))
            self.path.add(id(obj))
            self.depth += 1
            try:
                return (handler or self.resolve(tp))(obj, self)
            finally:
                self.depth -= 1
                self.path.discard(id(obj))
        except Exception:
            return _identity_key(obj)


def _fingerprint(obj: object, table: dict[type, _Handler], resolve: Callable[[type], _Handler]) -> Hashable:
    try:
        if type(obj) in _SCALARS:
            return obj  # hot path: no walker for plain scalars
        walker = _Walker(table, resolve)
        key = walker(obj)
        if walker.nodes <= _MAX_NODES:
            return key
        size = len(obj) if isinstance(obj, Sized) else None
        return ("<large>", _qualname(type(obj)), size)
    except Exception:  # a metaclass whose __hash__ raises, or a failing __len__
        return _identity_key(obj)


# --------------------------------------------------------------------------
# Handlers for builtin and stdlib types (exact-type dispatch).


def _same(obj: object, conv: _Walker) -> Hashable:
    return obj  # immutable builtins whose hash cannot fail


def _checked(obj: object, conv: _Walker) -> Hashable:
    hash(obj)  # Decimal('sNaN') or a datetime with a broken tzinfo raise here
    return obj


def _float(obj: float, conv: _Walker) -> Hashable:
    return obj if obj == obj else ("float", "nan")  # NaN != NaN would split routes


def _pairs(items: Iterable[tuple[Any, Any]], conv: _Walker) -> tuple[Hashable, ...]:
    pairs = [(conv(k), conv(v)) for k, v in items]
    if all(type(k) is str for k, _ in pairs):
        pairs.sort(key=operator.itemgetter(0))
    else:  # the repr orders keys of mixed types; `<` on sets is not a total order
        pairs.sort(key=lambda p: _safe_repr(p[0]))
    return tuple(pairs)


def _buffer(view: memoryview) -> Hashable:
    return view.tobytes() if view.nbytes <= _SMALL_BYTES else view.nbytes


_STDLIB_VALUES: tuple[type, ...] = (
    fractions.Fraction, datetime.date, datetime.timedelta, datetime.timezone,
    uuid.UUID, range, pathlib.PurePosixPath, pathlib.PureWindowsPath,
    pathlib.PosixPath, pathlib.WindowsPath,
)  # fmt: skip

_SCALARS: frozenset[type] = frozenset((int, str, bytes, bool, type(None), complex))

_LEAVES: frozenset[_Handler] = frozenset((_same, _checked, _float))

_BASE_TABLE: dict[type, _Handler] = {
    **{tp: _same for tp in _SCALARS},
    **{tp: _checked for tp in _STDLIB_VALUES},
    **{tp: _checked for tp in (decimal.Decimal, datetime.datetime, datetime.time)},
    float: _float,
    tuple: lambda o, c: tuple(c(i) for i in o),
    list: lambda o, c: ("list", tuple(c(i) for i in o)),
    dict: lambda o, c: ("dict", _pairs(o.items(), c)),
    set: lambda o, c: ("set", frozenset(c(i) for i in o)),
    frozenset: lambda o, c: ("set", frozenset(c(i) for i in o)),
    bytearray: lambda o, c: ("bytearray", bytes(o)),
    memoryview: lambda o, c: ("memoryview", o.format, o.shape, _buffer(o)),
    slice: lambda o, c: ("slice", c(o.start), c(o.stop), c(o.step)),
    array.array: lambda o, c: ("array", o.typecode, len(o), _buffer(memoryview(o))),
    collections.deque: lambda o, c: ("deque", o.maxlen, tuple(c(i) for i in o)),
    # OrderedDict equality is order-sensitive, so its key keeps the order.
    collections.OrderedDict: lambda o, c: ("OrderedDict", tuple((c(k), c(v)) for k, v in o.items())),
    collections.defaultdict: lambda o, c: ("defaultdict", _pairs(o.items(), c)),
    collections.Counter: lambda o, c: ("Counter", _pairs(o.items(), c)),
    collections.ChainMap: lambda o, c: ("ChainMap", tuple(c(m) for m in o.maps)),
}


# --------------------------------------------------------------------------
# Slow path for types outside the table: third-party probes, then structure.


def _third_party(tp: type) -> _Handler | None:
    np = sys.modules.get("numpy")  # only if the application imported it
    if np is not None:
        if issubclass(tp, np.ndarray):
            return lambda o, c: ("ndarray", tuple(o.shape), str(o.dtype))
        if issubclass(tp, np.generic):
            return lambda o, c: c(o.item())
    pd = sys.modules.get("pandas")
    if pd is not None:
        if issubclass(tp, pd.DataFrame):
            return lambda o, c: (
                "DataFrame",
                tuple(o.shape),
                tuple((str(col), str(dt)) for col, dt in o.dtypes.items()),
            )
        if issubclass(tp, pd.Series):
            return lambda o, c: ("Series", len(o), str(o.dtype), c(o.name))
    torch = sys.modules.get("torch")
    if torch is not None and issubclass(tp, torch.Tensor):
        return lambda o, c: ("Tensor", tuple(o.shape), str(o.dtype), o.device.type)
    return None


def _structural(obj: object, conv: _Walker) -> Hashable:
    try:
        hash(obj)
        return obj
    except Exception:
        pass  # unhashable (or a broken __hash__): describe its structure instead
    qualname = _qualname(type(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = tuple((f.name, conv(getattr(obj, f.name))) for f in dataclasses.fields(obj))
        return ("dataclass", qualname, fields)
    shape, dtype = getattr(obj, "shape", None), getattr(obj, "dtype", None)
    if shape is not None and dtype is not None:
        return (qualname, conv(shape), str(dtype))
    if isinstance(obj, Mapping):
        return ("mapping", qualname, _pairs(obj.items(), conv))
    if isinstance(obj, (list, tuple)):
        return (qualname, tuple(conv(i) for i in obj))
    if isinstance(obj, AbstractSet):
        return ("set", qualname, frozenset(conv(i) for i in obj))
    if isinstance(obj, Sized) and isinstance(obj, Iterable):
        return (qualname, len(obj))
    return (qualname, id(obj))


_STANDARD_TABLE: dict[type, _Handler] = dict(_BASE_TABLE)
_FAST_TABLE: dict[type, _Handler] = dict(_BASE_TABLE)


def _resolve_standard(tp: type) -> _Handler:
    handler = _third_party(tp) or _structural
    if len(_STANDARD_TABLE) < len(_BASE_TABLE) + _CACHE_LIMIT:
        _STANDARD_TABLE[tp] = handler  # the slow path runs once per type
    return handler


def _by_identity(obj: object, conv: _Walker) -> Hashable:
    return _identity_key(obj)


def _resolve_fast(tp: type) -> _Handler:
    return _by_identity  # FAST never looks inside unknown types


# --------------------------------------------------------------------------
# Public API.


def make_hashable(obj: object) -> Hashable:
    """Return the STANDARD fingerprint of ``obj``: hashable, never raises."""
    return _fingerprint(obj, _STANDARD_TABLE, _resolve_standard)


def fast_make_hashable(obj: object) -> Hashable:
    """Return the FAST fingerprint: builtins and stdlib only, others by identity."""
    return _fingerprint(obj, _FAST_TABLE, _resolve_fast)


def freeze(obj: object) -> Hashable:
    """Freeze a value (e.g. an ``external_calls`` list) into a hashable key.

    Same result as :func:`make_hashable`; kept as its own name for call sites
    that freeze configuration rather than fingerprint arguments.
    """
    return make_hashable(obj)


def args_fingerprint(
    args: tuple[Any, ...], kwargs: dict[str, Any], policy: HashPolicy
) -> Hashable:
    """Fingerprint a call's arguments; keyword order never matters."""
    policy = HashPolicy.parse(policy)
    if policy is HashPolicy.NONE:
        return ()
    conv = fast_make_hashable if policy is HashPolicy.FAST else make_hashable
    try:
        names = sorted(kwargs, key=lambda k: k if isinstance(k, str) else _safe_repr(k))
        return (tuple(conv(a) for a in args), tuple((k, conv(kwargs[k])) for k in names))
    except Exception:  # pragma: no cover - e.g. args that are not really a tuple
        return ("<args>", id(args), id(kwargs))


def routing_key(
    anchor: str, args: tuple[Any, ...], kwargs: dict[str, Any], policy: HashPolicy
) -> tuple[str, Hashable]:
    """Return ``(anchor, args_fingerprint(args, kwargs, policy))``; always hashable."""
    return (anchor, args_fingerprint(args, kwargs, policy))
