"""Tests for tokengate.fingerprint: never raises, always hashable, stable keys."""

from __future__ import annotations

import array
import collections
import copy
import dataclasses
import datetime
import decimal
import enum
import fractions
import hashlib
import pathlib
import subprocess
import sys
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokengate.errors import ConfigurationError
from tokengate.fingerprint import (
    ArgumentKey,
    DigestPolicy,
    HashPolicy,
    args_fingerprint,
    chosen_key,
    digest,
    fast_make_hashable,
    freeze,
    make_hashable,
    routing_key,
)

FINGERPRINTS = [make_hashable, fast_make_hashable, freeze]

# --------------------------------------------------------------------------
# Strategies and weird objects

hashables = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary()


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=5)
        | st.dictionaries(hashables, children, max_size=5)
        | st.tuples(children, children)
        | st.sets(hashables, max_size=5)
        | st.frozensets(hashables, max_size=5)
    )


values = st.recursive(hashables, _containers, max_leaves=30)
# NaN-free values for equality checks: tuples of NaN float objects compare by identity.
comparable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    _containers,
    max_leaves=30,
)


class HashRaises:
    def __hash__(self) -> int:
        raise RuntimeError("no hash")


class EqRaises:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    __hash__ = object.__hash__


class ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class LenRaises:
    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        raise RuntimeError("no len")

    def __iter__(self) -> Any:
        return iter(())


class GetattrRaises:
    __hash__ = None  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(name)


class BadMeta(type):
    def __hash__(cls) -> int:
        raise RuntimeError("metaclass hash")


class BadMetaInstance(metaclass=BadMeta):
    pass


class BrokenTz(datetime.tzinfo):
    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        raise RuntimeError("tz")

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        raise RuntimeError("tz")

    def tzname(self, dt: datetime.datetime | None) -> str:
        raise RuntimeError("tz")


class Colour(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int
    tags: list[str]


class Plain:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plain) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


def _self_list() -> list[Any]:
    lst: list[Any] = [1]
    lst.append(lst)
    return lst


def _self_dict() -> dict[str, Any]:
    dct: dict[str, Any] = {"a": 1}
    dct["self"] = dct
    return dct


def _deep_list(depth: int) -> list[Any]:
    root: list[Any] = []
    node = root
    for _ in range(depth):
        child: list[Any] = []
        node.append(child)
        node = child
    return root


def _shared_dag(levels: int) -> list[Any]:
    node: list[Any] = [0]
    for _ in range(levels):
        node = [node, node]  # 2**levels paths: must stay linear
    return node


def _released_view() -> memoryview:
    view = memoryview(b"abc")
    view.release()
    return view


WEIRD: list[Any] = [
    HashRaises(),
    EqRaises(),
    ReprRaises(),
    LenRaises(),
    GetattrRaises(),
    BadMetaInstance(),
    _self_list(),
    _self_dict(),
    _deep_list(1000),
    _shared_dag(60),
    {ReprRaises(): 1, ReprRaises(): 2, "x": [HashRaises()]},
    [HashRaises(), EqRaises(), {1: LenRaises()}],
    decimal.Decimal("sNaN"),
    datetime.datetime(2024, 1, 1, tzinfo=BrokenTz()),
    _released_view(),
    float("nan"),
    Point(1, ["a"]),
    collections.deque([1, [2]], maxlen=5),
    collections.ChainMap({"a": [1]}, {"b": 2}),
    collections.OrderedDict(a=[1]),
    collections.defaultdict(list, a=[1]),
    collections.Counter("hello"),
    array.array("d", [1.0, 2.0]),
    array.array("b", bytes(10_000)),
    memoryview(b"x" * 10_000),
    bytearray(b"xyz"),
    slice(1, [2], None),
    object(),
    type,
    lambda: None,
    iter([1, 2]),
]


# --------------------------------------------------------------------------
# Never raises, always hashable


@pytest.mark.parametrize("fingerprint", FINGERPRINTS)
@given(value=values)
@settings(max_examples=200, deadline=None)
def test_structured_values_never_raise_and_are_hashable(fingerprint: Any, value: Any) -> None:
    key = fingerprint(value)
    hash(key)
    # The key is the value's, not the object's: an equal copy has the same key
    assert fingerprint(copy.deepcopy(value)) == key


# NaN nowhere (not even in sets or dict keys): NaN keys route together by design, though NaN != NaN.
# Strings of at most 2 characters: a tuple spelling a tag, ("list", (1, 2)), has the key of [1, 2]
# by design (tuples are untagged); no tag is that short.
_plain = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=2) | st.binary()
nan_free = st.recursive(
    _plain,
    lambda children: (st.lists(children, max_size=5) | st.dictionaries(_plain, children, max_size=5)
                      | st.tuples(children, children) | st.sets(_plain, max_size=5)
                      | st.frozensets(_plain, max_size=5)),
    max_leaves=30,
)


@pytest.mark.parametrize("fingerprint", FINGERPRINTS)
@given(a=nan_free, b=nan_free)
@settings(max_examples=200, deadline=None)
def test_different_structured_values_get_different_keys(fingerprint: Any, a: Any, b: Any) -> None:
    # A key that ignored part of a value (a container's items, a dict's values) would route
    # different calls together: equal keys may only come from equal values (1 == 1.0 == True).
    if fingerprint(a) == fingerprint(b):
        assert a == b, (a, b, fingerprint(a))


@pytest.mark.parametrize("fingerprint", FINGERPRINTS)
@pytest.mark.parametrize("value", WEIRD, ids=lambda v: type(v).__name__)
def test_weird_objects_never_raise_and_are_hashable(fingerprint: Any, value: Any) -> None:
    hash(fingerprint(value))
    hash(fingerprint(value))  # and again: the first call must not have left anything broken


def _mutations() -> list[tuple[str, Any, Any, bool]]:
    """(name, value, an in-place change of its contents, does FAST see inside it?); fresh values per call."""
    counter = collections.Counter("hello")
    backing = bytearray(b"x" * 10)
    chain = collections.ChainMap({"a": [1]}, {"b": 2})
    point = Point(1, ["a"])
    sliced = slice(1, [2], None)
    return [
        ("deque", collections.deque([1, [2]], maxlen=5), lambda d: d.append(3), True),
        ("deque item", collections.deque([1, [2]], maxlen=5), lambda d: d[1].append(3), True),
        ("ChainMap", chain, lambda c: c.maps[1].__setitem__("b", 3), True),
        ("OrderedDict", collections.OrderedDict(a=[1]), lambda o: o["a"].append(2), True),
        ("defaultdict", collections.defaultdict(list, a=[1]), lambda d: d["a"].append(2), True),
        ("Counter", counter, lambda c: c.update("h"), True),
        ("array", array.array("d", [1.0, 2.0]), lambda a: a.__setitem__(0, 9.0), True),
        ("bytearray", bytearray(b"xyz"), lambda b: b.__setitem__(0, 0), True),
        ("memoryview", memoryview(backing), lambda _: backing.__setitem__(9, 0), True),
        ("slice", sliced, lambda s: s.stop.append(3), True),
        ("dataclass", point, lambda p: p.tags.append("b"), False),  # FAST keys it by identity
        ("list in dict", {"k": [1]}, lambda d: d["k"].append(2), True),
        ("set in list", [{1}], lambda lst: lst[0].add(2), True),
    ]


@pytest.mark.parametrize("fingerprint", FINGERPRINTS)
@pytest.mark.parametrize("index", range(len(_mutations())), ids=[m[0] for m in _mutations()])
def test_the_key_reflects_the_contents(fingerprint: Any, index: int) -> None:
    name, value, mutate, fast_looks_inside = _mutations()[index]
    # Given the key of a value with contents, and the key of an equal copy
    before = fingerprint(value)
    hash(before)
    by_value = fingerprint is not fast_make_hashable or fast_looks_inside
    if by_value and name != "memoryview":  # a copy of a view is a new buffer: same bytes, same key
        assert fingerprint(copy.deepcopy(value)) == before
    # When its contents change in place
    mutate(value)
    after = fingerprint(value)
    # Then its key changes (or, keyed by identity, stays the object's)
    if by_value:
        assert after != before, f"{name}: the key ignored a change of contents"
    else:
        assert after == before


@pytest.mark.parametrize("policy", list(HashPolicy))
@pytest.mark.parametrize("value", WEIRD, ids=lambda v: type(v).__name__)
def test_routing_key_with_weird_arguments_is_hashable(policy: HashPolicy, value: Any) -> None:
    hash(routing_key("anchor", (value, value), {"k": value}, policy))


def test_recursion_markers() -> None:
    assert ("<cycle>", "list") in make_hashable(_self_list())[1]  # type: ignore[index]
    key = make_hashable(_deep_list(1000))
    for _ in range(40):
        if key == ("<deep>", "list"):
            break
        key = key[1][0]  # type: ignore[index]
    assert key == ("<deep>", "list")


def test_shared_dag_is_summarised_and_cheap_to_hash() -> None:
    key = make_hashable(_shared_dag(60))
    assert key == ("<large>", "list", 2)
    hash(key)
    wide = [[i] for i in range(20_000)]  # more than the node budget
    assert make_hashable(wide) == ("<large>", "list", 20_000)
    assert make_hashable(wide[:100]) == ("list", tuple(("list", (i,)) for i in range(100)))


def test_failing_nodes_fall_back_to_identity() -> None:
    bad = LenRaises()
    assert make_hashable(bad) == ("LenRaises", id(bad))
    view = _released_view()
    assert make_hashable(view) == ("memoryview", id(view))


# --------------------------------------------------------------------------
# Stability


@given(value=comparable)
@settings(max_examples=200, deadline=None)
def test_equal_structures_give_equal_keys(value: Any) -> None:
    assert make_hashable(value) == make_hashable(copy.deepcopy(value))
    assert fast_make_hashable(value) == fast_make_hashable(copy.deepcopy(value))


def test_dict_insertion_order_does_not_matter() -> None:
    first = {"b": [1, 2], "a": {"y": 1, "x": 2}, 3: "mixed key types"}
    second = {3: "mixed key types", "a": {"x": 2, "y": 1}, "b": [1, 2]}
    assert make_hashable(first) == make_hashable(second)
    assert fast_make_hashable(first) == fast_make_hashable(second)


def test_dict_with_partially_ordered_keys_is_order_independent() -> None:
    keys = [frozenset({1}), frozenset({2}), frozenset({1, 2}), (1, "a"), None]
    first = {k: i for i, k in enumerate(keys)}
    second = {k: first[k] for k in reversed(keys)}
    assert make_hashable(first) == make_hashable(second)


def test_kwargs_order_does_not_matter() -> None:
    for policy in HashPolicy:
        assert args_fingerprint((1,), {"a": [1], "b": {2}}, policy) == args_fingerprint(
            (1,), {"b": {2}, "a": [1]}, policy
        )


def test_nan_routes_together() -> None:
    assert make_hashable([float("nan")]) == make_hashable([float("nan")])


def test_shared_structure_equals_copied_structure() -> None:
    inner = [1, 2]
    assert make_hashable([inner, inner]) == make_hashable([[1, 2], [1, 2]])


# --------------------------------------------------------------------------
# Distinctness (documented choices)


@pytest.mark.parametrize("fingerprint", FINGERPRINTS)
def test_distinct_values_give_distinct_keys(fingerprint: Any) -> None:
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint([1, 2]) != fingerprint((1, 2))  # lists are tagged, tuples are not
    assert fingerprint({1, 2}) != fingerprint([1, 2])
    assert fingerprint(bytearray(b"a")) != fingerprint(b"a")
    assert fingerprint(collections.OrderedDict(a=1, b=2)) != fingerprint(
        collections.OrderedDict(b=2, a=1)
    )


def test_stdlib_values_are_their_own_keys() -> None:
    values: list[Any] = [
        decimal.Decimal("1.5"),
        fractions.Fraction(1, 3),
        datetime.datetime(2024, 1, 2, 3, 4),
        datetime.date(2024, 1, 2),
        datetime.time(1, 2),
        datetime.timedelta(seconds=3),
        uuid.UUID(int=7),
        pathlib.Path("/tmp/x"),
        pathlib.PurePosixPath("a/b"),
        range(3),
        Colour.RED,
        "s",
        b"b",
        3,
        1.5,
        None,
        2j,
    ]
    for value in values:
        assert make_hashable(value) == value
        assert fast_make_hashable(value) == value or isinstance(value, enum.Enum)


def test_structural_fallbacks() -> None:
    assert make_hashable(Point(1, ["a"])) == (
        "dataclass",
        "Point",
        (("x", 1), ("tags", ("list", ("a",)))),
    )
    assert make_hashable(Plain(3)) == Plain(3)  # hashable objects are used as is
    assert make_hashable(array.array("b", b"ab")) == ("array", "b", 2, b"ab")
    assert make_hashable(memoryview(b"x" * 5000)) == ("memoryview", "B", (5000,), 5000)


def test_shape_and_dtype_duck_type() -> None:
    class Arrayish:
        __hash__ = None  # type: ignore[assignment]
        shape = (2, 3)
        dtype = "f4"

    assert make_hashable(Arrayish()) == (Arrayish.__qualname__, (2, 3), "f4")


def test_unknown_type_handler_is_cached() -> None:
    from tokengate import fingerprint as fp

    class Fresh:
        pass

    assert Fresh not in fp._STANDARD_TABLE
    make_hashable(Fresh())
    assert Fresh in fp._STANDARD_TABLE


# --------------------------------------------------------------------------
# Third-party types: numpy only when already imported


def test_numpy_arrays_key_on_shape_and_dtype_not_contents() -> None:
    np = pytest.importorskip("numpy")
    same_a = make_hashable(np.zeros((2, 3)))
    same_b = make_hashable(np.ones((2, 3)))
    assert same_a == same_b == ("ndarray", (2, 3), "float64")
    assert make_hashable(np.zeros((3, 2))) != same_a
    assert make_hashable(np.zeros((2, 3), dtype=np.int32)) != same_a
    assert make_hashable(np.float64(1.5)) == 1.5
    assert make_hashable([np.int64(2)]) == make_hashable([2])


def test_fingerprinting_does_not_import_numpy() -> None:
    code = (
        "import sys\n"
        "from tokengate.fingerprint import make_hashable, routing_key, HashPolicy\n"
        "class X: pass\n"
        "make_hashable([1, {'a': (2, 3)}, X(), {4}])\n"
        "routing_key('a', ([1],), {'k': X()}, HashPolicy.STANDARD)\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# Policies and digests


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("none", HashPolicy.NONE), ("FAST", HashPolicy.FAST), (" Standard ", HashPolicy.STANDARD),
     ("full", HashPolicy.FULL), (HashPolicy.FAST, HashPolicy.FAST)],
)  # fmt: skip
def test_hash_policy_parse(raw: Any, expected: HashPolicy) -> None:
    assert HashPolicy.parse(raw) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("full", DigestPolicy.FULL), ("Short", DigestPolicy.SHORT), ("FAST", DigestPolicy.FAST),
     ("minimal", DigestPolicy.MINIMAL), (DigestPolicy.SHORT, DigestPolicy.SHORT)],
)  # fmt: skip
def test_digest_policy_parse(raw: Any, expected: DigestPolicy) -> None:
    assert DigestPolicy.parse(raw) is expected


@pytest.mark.parametrize("enum_cls", [HashPolicy, DigestPolicy])
@pytest.mark.parametrize("bad", ["bogus", "", 3, None])
def test_parse_rejects_bad_values(enum_cls: Any, bad: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        enum_cls.parse(bad)
    message = str(info.value)
    assert repr(bad) in message
    for member in enum_cls:
        assert member.value in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("policy", "length"),
    [(DigestPolicy.FULL, 64), (DigestPolicy.SHORT, 16), (DigestPolicy.FAST, 16),
     (DigestPolicy.MINIMAL, 8)],
)  # fmt: skip
def test_digest_lengths_and_determinism(policy: DigestPolicy, length: int) -> None:
    out = digest("anchor:(1, 2)", policy)
    assert len(out) == length
    assert int(out, 16) >= 0
    assert digest("anchor:(1, 2)", policy) == out
    assert digest("anchor:(1, 3)", policy) != out


def test_digest_algorithms() -> None:
    data = "some material \u00e9"
    sha = hashlib.sha256(data.encode()).hexdigest()
    assert digest(data) == sha
    assert digest(data, DigestPolicy.SHORT) == sha[:16]
    assert digest(data, DigestPolicy.MINIMAL) == sha[:8]
    assert digest(data, DigestPolicy.FAST) == hashlib.blake2s(data.encode(), digest_size=8).hexdigest()
    digest("lone surrogate \ud800")  # must not raise


# --------------------------------------------------------------------------
# routing_key and args_fingerprint


def test_none_policy_ignores_arguments() -> None:
    assert args_fingerprint((1, [2]), {"a": 3}, HashPolicy.NONE) == ()
    assert routing_key("a", (1,), {}, HashPolicy.NONE) == routing_key(
        "a", (HashRaises(), [2]), {"x": 1}, HashPolicy.NONE
    ) == ("a", ())


def test_fast_policy_keys_custom_objects_by_identity() -> None:
    one, other = Plain(1), Plain(1)
    assert one == other
    fast = HashPolicy.FAST
    assert routing_key("a", (one,), {}, fast) != routing_key("a", (other,), {}, fast)
    assert routing_key("a", (one,), {}, fast) == routing_key("a", (one,), {}, fast)
    # STANDARD uses the objects' own equality instead.
    std = HashPolicy.STANDARD
    assert routing_key("a", (one,), {}, std) == routing_key("a", (other,), {}, std)


@pytest.mark.parametrize("policy", [HashPolicy.FAST, HashPolicy.STANDARD, HashPolicy.FULL])
def test_routing_key_shape(policy: HashPolicy) -> None:
    key = routing_key("anchor", (1, [2]), {"b": {3}, "a": "x"}, policy)
    assert key == ("anchor", ((1, ("list", (2,))), (("a", "x"), ("b", ("set", frozenset({3}))))))
    assert routing_key("other", (1, [2]), {"b": {3}, "a": "x"}, policy) != key
    assert routing_key("anchor", (1, [3]), {"b": {3}, "a": "x"}, policy) != key
    assert routing_key("anchor", (1, [2]), {"b": {3}, "a": "x"}, policy.value) == key  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Keys chosen from the arguments: ArgumentKey, BoundKey, chosen_key


def _every_kind(a: int, /, b: int, c: int = 3, *rest: int, d: int, e: int = 5, **extra: int) -> None:
    return None


@pytest.mark.parametrize(
    ("name", "args", "kwargs", "value"),
    [
        ("a", (1, 2), {"d": 4}, 1),
        ("b", (1, 2), {"d": 4}, 2),
        ("b", (1,), {"b": 2, "d": 4}, 2),
        ("c", (1, 2), {"d": 4}, 3),  # the default
        ("c", (1, 2, 30), {"d": 4}, 30),
        ("c", (1,), {"b": 2, "c": 30, "d": 4}, 30),
        ("rest", (1, 2, 3, 7, 8), {"d": 4}, (7, 8)),
        ("rest", (1, 2), {"d": 4}, ()),
        ("d", (1, 2), {"d": 4}, 4),
        ("e", (1, 2), {"d": 4}, 5),
        ("extra", (1, 2), {"d": 4, "z": 9, "a": 1}, {"z": 9, "a": 1}),  # a positional-only name may be a keyword
    ],
)
def test_bound_names_pick_each_kind_of_parameter(name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                                                 value: Any) -> None:
    assert ArgumentKey.parse(name).bind(_every_kind).values(args, kwargs) == value


def test_positional_and_keyword_spellings_give_one_key() -> None:
    def pay(account_id: str, amount: int, ref: str = "") -> None:
        return None

    bound = ArgumentKey.parse("account_id").bind(pay)
    keys = {bound.key("pay", args, kwargs, HashPolicy.STANDARD)
            for args, kwargs in [(("acme", 1), {}), (("acme",), {"amount": 2}),
                                 ((), {"amount": 3, "account_id": "acme"}), (("acme", 4, "r"), {})]}
    assert keys == {("pay", "acme")}
    several = ArgumentKey.parse(("ref", "account_id")).bind(pay)
    assert several.values(("acme", 1), {}) == ("", "acme")
    assert several.values((), {"account_id": "acme", "amount": 1, "ref": "x"}) == ("x", "acme")


def test_a_missing_argument_has_a_marker_key_not_an_error() -> None:
    def pay(account_id: str) -> None:
        return None

    value = ArgumentKey.parse("account_id").bind(pay).values((), {})
    assert repr(value) == "<missing>"
    assert chosen_key("pay", value, HashPolicy.STANDARD) == chosen_key("pay", value, HashPolicy.STANDARD)


def test_a_key_function_gets_every_argument_by_name_with_defaults() -> None:
    seen: list[dict[str, Any]] = []

    def key(**arguments: Any) -> str:
        seen.append(arguments)
        return "k"

    bound = ArgumentKey.parse(key).bind(_every_kind)
    assert bound.values((1, 2, 3, 7), {"d": 4, "z": 9}) == "k"
    assert seen == [{"a": 1, "b": 2, "c": 3, "rest": (7,), "d": 4, "e": 5, "extra": {"z": 9}}]
    # An argument the call leaves out with no default is not passed: the key function decides
    seen.clear()
    bound.values((1,), {})
    assert seen == [{"a": 1, "c": 3, "rest": (), "e": 5, "extra": {}}]


def test_a_key_function_exception_propagates() -> None:
    bound = ArgumentKey.parse(lambda doc, **_: doc["id"]).bind(lambda doc: None)
    with pytest.raises(KeyError):
        bound.values(({},), {})


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "parameter names"),
        ("two words", "parameter names"),
        (["a", 1], "parameter names"),
        ([], "at least one"),
        (("a", "b", "a"), "more than once"),
        (None, "parameter name, a tuple"),
        (int, "parameter name, a tuple"),
    ],
)
def test_argument_key_parse_refuses(value: Any, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        ArgumentKey.parse(value)


def test_bind_refuses_what_does_not_fit_the_function() -> None:
    with pytest.raises(ConfigurationError, match=r"'x', 'y', which are not a parameter of .*_every_kind\(a, b, c, "
                                                 r"\*rest, d, e, \*\*extra\)"):
        ArgumentKey.parse(("x", "b", "y")).bind(_every_kind)
    with pytest.raises(ConfigurationError, match="did you mean 'rest'"):
        ArgumentKey.parse("rst").bind(_every_kind)
    with pytest.raises(ConfigurationError, match="cannot take them"):
        ArgumentKey.parse(lambda a, b: a).bind(_every_kind)
    with pytest.raises(ConfigurationError, match="cannot take them"):
        ArgumentKey.parse(lambda q, **_: q).bind(_every_kind)  # q is not an argument of the function
    with pytest.raises(ConfigurationError, match="signature"):
        ArgumentKey.parse("a").bind(type)


def test_argument_key_equality_and_repr() -> None:
    def key(**_: Any) -> int:
        return 1

    assert ArgumentKey.parse("a") == ArgumentKey.parse(["a"]) == ArgumentKey(names=("a",))
    assert ArgumentKey.parse("a") != ArgumentKey.parse(("a", "b"))
    assert ArgumentKey.parse(key) == ArgumentKey.parse(key)
    assert hash(ArgumentKey.parse(key)) == hash(ArgumentKey(function=key))
    assert repr(ArgumentKey.parse(key)).startswith("ArgumentKey(test_argument_key_equality_and_repr.")
    with pytest.raises(ConfigurationError):
        ArgumentKey()


def test_chosen_key_applies_the_hash_policy() -> None:
    one, other = Plain(1), Plain(1)
    assert chosen_key("a", one, HashPolicy.STANDARD) == chosen_key("a", other, HashPolicy.STANDARD)
    assert chosen_key("a", one, HashPolicy.FAST) != chosen_key("a", other, HashPolicy.FAST)
    assert chosen_key("a", [1, {2}], HashPolicy.FULL) == ("a", make_hashable([1, {2}]))
    assert chosen_key("a", HashRaises(), HashPolicy.STANDARD)[0] == "a"  # never raises
    assert chosen_key("a", 1, HashPolicy.NONE) == ("a", ())


@settings(max_examples=200, deadline=None)
@given(account=st.text(max_size=8), amount=st.integers(), ref=st.text(max_size=4), spelling=st.integers(0, 3))
def test_any_spelling_of_a_call_gives_its_account_key(account: str, amount: int, ref: str, spelling: int) -> None:
    def pay(account_id: str, amount: int, ref: str = "") -> None:
        return None

    bound = ArgumentKey.parse("account_id").bind(pay)
    args, kwargs = [((account, amount, ref), {}), ((account,), {"amount": amount, "ref": ref}),
                    ((), {"ref": ref, "amount": amount, "account_id": account}), ((account, amount), {})][spelling]
    assert bound.key("pay", args, kwargs, HashPolicy.STANDARD) == ("pay", account)
