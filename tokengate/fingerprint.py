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

Keys chosen from the arguments (the ``sticky_key`` tag): :class:`ArgumentKey`
names the parameters that form the key (or holds a function of the
arguments); :meth:`ArgumentKey.bind` checks it against the decorated
function's signature once and returns a :class:`BoundKey`, which picks the
chosen values out of each call's ``args``/``kwargs`` (positional and keyword
calls give the same values) for :func:`chosen_key` to fingerprint.
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
import inspect
import operator
import pathlib
import sys
import uuid
from collections.abc import Callable, Hashable, Iterable, Mapping, Sized
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

from tokengate.errors import ConfigurationError, Rejected

__all__ = [
    "ArgumentKey", "BoundKey", "DigestPolicy", "HashPolicy", "StickyKeyError",
    "args_fingerprint", "chosen_key", "digest", "fast_make_hashable", "freeze",
    "make_hashable", "routing_key",
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


# --------------------------------------------------------------------------
# Keys chosen from the arguments (the sticky_key tag).


class StickyKeyError(Rejected, ConfigurationError):
    """A call refused at submission because its ``sticky_key`` could not give a key.

    Either the tag does not fit the function (a name that is not one of its
    parameters: found at decoration when the decorator checks tags against the
    function, else at the function's first call, and then every call is
    refused), or the key function raised for these arguments (its exception is
    ``__cause__``). The call never ran and was never accepted. It is both a
    :class:`~tokengate.errors.Rejected` and a
    :class:`~tokengate.errors.ConfigurationError` (a ``ValueError``).
    """

    def __init__(self, message: str, *, operation_type: str | None = None) -> None:
        super().__init__(message, operation_type=operation_type, reason="sticky_key")


class _Missing:
    """An argument the call did not give and whose parameter has no default (the call will fail when run)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
_Getter = Callable[[tuple[Any, ...], Mapping[str, Any]], Any]
_P = inspect.Parameter


def _callable_name(func: object) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    return name if isinstance(name, str) else _qualname(type(func))


class ArgumentKey:
    """Which arguments of a call form its key: parameter names, or a function of the arguments.

    The parsed value of the ``sticky_key`` tag. ``names`` holds parameter
    names (the key is the value of the one name, or the tuple of the values of
    several, in the order given); ``function``, when set, is called with every
    argument of the call by parameter name (defaults applied) and returns the
    key, e.g. ``lambda account_id, **_: account_id.lower()``.

    Only the values enter the key, not the names: functions that share a
    ``sticky_anchor`` share a key whenever their chosen values are equal, so
    ``deposit(account_id, ...)`` and ``withdraw(account, ...)`` can be ordered
    together per account.
    """

    __slots__ = ("names", "function")

    def __init__(self, names: tuple[str, ...] = (), function: Callable[..., Any] | None = None) -> None:
        if bool(names) == (function is not None):
            raise ConfigurationError("an ArgumentKey holds parameter names or a function, exactly one of them")
        self.names = names
        self.function = function

    @classmethod
    def parse(cls, value: Any) -> ArgumentKey:
        """Parse a ``sticky_key`` tag value: a parameter name, a tuple (or list) of them, or a callable.

        Checks what can be checked without the function (the shape, that names
        are identifiers, that a callable's signature can be read); :meth:`bind`
        checks the rest against the function.

        Raises:
            ConfigurationError: naming the value and the fix.
        """
        if isinstance(value, ArgumentKey):
            return value
        if isinstance(value, str):
            return cls(names=(cls._name(value),))
        if isinstance(value, (tuple, list)):
            if not value:
                raise ConfigurationError("sticky_key must name at least one parameter, got an empty "
                                         f"{type(value).__name__}")
            names = tuple(cls._name(item) for item in value)
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ConfigurationError(f"sticky_key names {', '.join(map(repr, twice))} more than once in {value!r}")
            return cls(names=names)
        if isinstance(value, type) or not callable(value):
            raise ConfigurationError(
                f"sticky_key must be a parameter name, a tuple of parameter names, or a function of the "
                f"arguments (e.g. lambda account_id, **_: account_id.lower()); got {type(value).__name__} {value!r}")
        if inspect.iscoroutinefunction(value):
            raise ConfigurationError(f"sticky_key must be a plain function, but {value!r} is a coroutine function")
        try:
            inspect.signature(value)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"cannot read the signature of the sticky_key function {value!r}: {exc}; "
                                     "use a plain function or lambda") from None
        return cls(function=value)

    @staticmethod
    def _name(item: Any) -> str:
        if not isinstance(item, str) or not item.isidentifier():
            raise ConfigurationError(f"sticky_key entries must be parameter names, got {item!r}")
        return item

    def bind(self, func: Callable[..., Any]) -> BoundKey:
        """Check this key against *func*'s signature; return what picks the key out of its calls.

        *func* is the decorated callable as it is called (for a method, the
        plain function with its ``self``; for a partial, its remaining
        parameters).

        Raises:
            ConfigurationError: a name that is not a parameter of *func* (the
                message lists its parameters), a key function that cannot take
                *func*'s arguments by name, or a *func* whose signature cannot
                be read.
        """
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError) as exc:
            message = f"sticky_key needs the signature of {func!r}, which cannot be read: {exc}"
            raise ConfigurationError(message) from None
        params = list(signature.parameters.values())
        where = f"{_callable_name(func)}({', '.join(_shown(p) for p in params)})"
        getters = _getters(params)
        if self.function is None:
            unknown = [n for n in self.names if n not in getters]
            if unknown:
                close = [m for n in unknown for m in _close_names(n, list(getters))]
                hint = f"; did you mean {close[0]!r}?" if close else ""
                names = ", ".join(repr(n) for n in unknown)
                raise ConfigurationError(f"sticky_key names {names}, which {'is' if len(unknown) == 1 else 'are'} "
                                         f"not a parameter of {where}{hint}")
            chosen = [getters[n] for n in self.names]
            if len(chosen) == 1:
                values = chosen[0]
            else:
                def values(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
                    return tuple(get(args, kwargs) for get in chosen)
            return BoundKey(self, where, values)
        function = self.function
        try:
            inspect.signature(function).bind(**{p.name: None for p in params})
        except TypeError as exc:
            raise ConfigurationError(
                f"the sticky_key function {_callable_name(function)}{inspect.signature(function)} is called with "
                f"the arguments of {where} by name and cannot take them ({exc}); give it the parameters it needs "
                "and **_ for the rest, e.g. lambda account_id, **_: account_id.lower()") from None
        pairs = tuple(getters.items())

        def call_function(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            bound = {}
            for name, get in pairs:
                value = get(args, kwargs)
                if value is not _MISSING:
                    bound[name] = value
            return function(**bound)

        return BoundKey(self, where, call_function)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ArgumentKey):
            return NotImplemented
        return self.names == other.names and self.function is other.function

    def __hash__(self) -> int:
        return hash((self.names, id(self.function)))

    def __repr__(self) -> str:
        if self.function is not None:
            return f"ArgumentKey({_callable_name(self.function)})"
        return f"ArgumentKey({', '.join(map(repr, self.names))})"


class BoundKey:
    """An :class:`ArgumentKey` checked against one function: picks the chosen values out of its calls.

    ``values(args, kwargs)`` returns the value of the one chosen parameter, the
    tuple of the values of several, or what the key function returns;
    positional and keyword spellings of a call give the same values, and a
    parameter the call leaves out counts with its default. It never raises for
    names (an argument missing with no default is ``<missing>``: the call
    itself will fail when run); a key function's own exception propagates.
    """

    __slots__ = ("spec", "where", "values")

    def __init__(self, spec: ArgumentKey, where: str, values: _Getter) -> None:
        self.spec = spec
        self.where = where  # "f(a, b, *, c)": for messages
        self.values: _Getter = values

    def key(self, anchor: str, args: tuple[Any, ...], kwargs: Mapping[str, Any],
            policy: HashPolicy) -> tuple[str, Hashable]:
        """``chosen_key(anchor, self.values(args, kwargs), policy)``. Raises what a key function raises."""
        return chosen_key(anchor, self.values(args, kwargs), policy)

    def __repr__(self) -> str:
        return f"<BoundKey {self.spec!r} of {self.where}>"


def chosen_key(anchor: str, value: object, policy: HashPolicy) -> tuple[str, Hashable]:
    """The routing key of a call whose key values were chosen: ``(anchor, fingerprint(value))``.

    *policy* applies to the chosen value as it does to all the arguments in
    :func:`routing_key`: FAST keys unknown objects by identity, STANDARD and
    FULL look inside; NONE (which ignores the arguments) gives ``(anchor, ())``.
    Never raises.
    """
    if policy is HashPolicy.STANDARD or policy is HashPolicy.FULL:
        return (anchor, make_hashable(value))
    if policy is HashPolicy.FAST:
        return (anchor, fast_make_hashable(value))
    return (anchor, ())


def _shown(param: inspect.Parameter) -> str:
    if param.kind is _P.VAR_POSITIONAL:
        return f"*{param.name}"
    if param.kind is _P.VAR_KEYWORD:
        return f"**{param.name}"
    return param.name


def _close_names(name: str, names: list[str]) -> list[str]:
    import difflib  # only on the error path

    return difflib.get_close_matches(name, names, n=1)


def _getters(params: list[inspect.Parameter]) -> dict[str, _Getter]:
    """One getter per parameter: the value a call gives it, bound as Python binds arguments.

    Assumes a call Python would accept; for others (too few arguments) a value
    may be ``_MISSING``, and a keyword that repeats a positional argument is
    ignored: the call fails with TypeError when it runs.
    """
    keywordable = frozenset(p.name for p in params if p.kind in (_P.POSITIONAL_OR_KEYWORD, _P.KEYWORD_ONLY))
    out: dict[str, _Getter] = {}
    index = 0
    for param in params:
        out[param.name] = _getter(param, index, keywordable)
        if param.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD):
            index += 1
    return out


def _getter(param: inspect.Parameter, index: int, keywordable: frozenset[str]) -> _Getter:
    name = param.name
    default = _MISSING if param.default is param.empty else param.default
    kind = param.kind
    # Closures specialised per kind: the hot path is one length check and an index.
    if kind is _P.POSITIONAL_OR_KEYWORD:
        def positional_or_keyword(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return args[index] if len(args) > index else kwargs.get(name, default)
        return positional_or_keyword
    if kind is _P.POSITIONAL_ONLY:
        def positional_only(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return args[index] if len(args) > index else default
        return positional_only
    if kind is _P.KEYWORD_ONLY:
        def keyword_only(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return kwargs.get(name, default)
        return keyword_only
    if kind is _P.VAR_POSITIONAL:
        def var_positional(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
            return tuple(args[index:])
        return var_positional

    def var_keyword(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        return {k: v for k, v in kwargs.items() if k not in keywordable}
    return var_keyword
