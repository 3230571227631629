"""Tests for tokengate.complexity."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest

from tokengate.complexity import (
    ComplexityClass,
    ComplexityReport,
    analyze,
    default_weight,
)


def trivial() -> int:
    return 1


def busy(data: list[list[int]], mapping: dict[str, int]) -> dict[str, Any]:
    total = 0
    out: list[int] = []
    for row in data:
        for value in row:
            if value > 10:
                total += abs(value)
            elif value < -10:
                total -= max(value, -100)
            else:
                out.append(min(value, 5))
    squares = [x * x for row in data for x in row if x % 2 == 0]
    keys = sorted(mapping.keys())
    while total > 1000:
        total = total // 2
        if total % 3 == 0:
            total -= 1
    lookup = {k: str(v) for k, v in mapping.items() if v}
    text = ",".join(str(s) for s in squares)
    return {
        "total": int(total),
        "out": list(out),
        "keys": tuple(keys),
        "lookup": dict(lookup),
        "text": text.upper().strip(),
        "n": len(squares) + len(keys) + round(float(total)),
    }


def inline_loop(xs: list[int]) -> list[int]:
    out = []
    for x in xs:
        if x:
            out.append(x * 2)
    return out


def comprehension_loop(xs: list[int]) -> list[int]:
    return [x * 2 for x in xs if x]


def generator_loop(xs: list[int]) -> int:
    return sum(x * 2 for x in xs if x)


class Adder:
    def __init__(self, base: int) -> None:
        self.base = base

    def __call__(self, x: int) -> int:
        for _ in range(3):
            x += self.base
        return x

    def method(self, values: list[int]) -> int:
        acc = 0
        for v in values:
            acc += v
        return acc


def test_trivial_function_is_trivial_and_light() -> None:
    report = analyze(trivial)
    assert report.has_code is True
    assert report.complexity_class is ComplexityClass.TRIVIAL
    assert report.score < 10
    assert report.loops == 0
    assert report.branches == 0
    assert report.calls == 0
    assert report.nested_code_objects == 0
    assert report.instructions >= 1  # RETURN_CONST on 3.12+, two ops before
    assert default_weight(report) == "light"


def test_busy_function_scores_higher_with_expected_features() -> None:
    base = analyze(trivial)
    report = analyze(busy)
    assert report.score > base.score
    assert report.complexity_class not in (ComplexityClass.TRIVIAL,)
    # two for loops, one while loop, plus loops inside comprehensions/genexpr
    assert report.loops >= 3
    assert report.branches >= 4
    assert report.calls >= 10
    assert report.names >= 5
    assert report.instructions > base.instructions
    # genexpr is always a nested code object; list/dict comps are on <=3.11
    assert report.nested_code_objects >= 1
    assert default_weight(report) in ("medium", "heavy")


def test_comprehension_work_counts() -> None:
    base = analyze(trivial)
    inline = analyze(inline_loop)
    comp = analyze(comprehension_loop)
    gen = analyze(generator_loop)
    for report in (inline, comp, gen):
        assert report.score > base.score
        assert report.loops >= 1
        assert report.branches >= 1
    # The generator expression's loop lives only in the nested code object,
    # so counting it proves nested code is walked.
    assert gen.nested_code_objects >= 1


def test_builtin_has_no_code() -> None:
    report = analyze(len)
    assert report.has_code is False
    assert report.score == 0
    assert report.complexity_class is ComplexityClass.TRIVIAL
    assert default_weight(report) == "light"


def test_partial_is_unwrapped() -> None:
    part = functools.partial(inline_loop, [1, 2, 3])
    assert analyze(part) == analyze(inline_loop)
    nested = functools.partial(functools.partial(busy, []), {})
    assert analyze(nested) == analyze(busy)


def test_partial_of_builtin() -> None:
    assert analyze(functools.partial(max, 1)).has_code is False


def test_wraps_chain_is_unwrapped() -> None:
    def deco(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        return wrapper

    wrapped = deco(deco(busy))
    assert analyze(wrapped) == analyze(busy)


def test_callable_object_uses_dunder_call() -> None:
    adder = Adder(2)
    report = analyze(adder)
    assert report.has_code is True
    assert report.loops >= 1
    assert report == analyze(Adder.__call__)


def test_bound_method() -> None:
    bound = Adder(1).method
    report = analyze(bound)
    assert report.has_code is True
    assert report.loops >= 1
    assert report == analyze(Adder.method)


def test_class_uses_init_and_lambda_works() -> None:
    assert analyze(Adder).has_code is True
    assert analyze(lambda: 1).complexity_class is ComplexityClass.TRIVIAL
    assert analyze(dict).has_code is False


def test_hostile_callable_never_raises() -> None:
    class Hostile:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("boom")

        def __call__(self) -> None:
            return None

    report = analyze(Hostile())
    assert isinstance(report, ComplexityReport)

    class SelfWrapped:
        """__wrapped__ pointing at a fresh object each time must terminate."""

        @property
        def __wrapped__(self) -> SelfWrapped:
            return SelfWrapped()

        def __call__(self) -> None:
            return None

    assert analyze(SelfWrapped()).has_code is False


@pytest.mark.parametrize(
    "func",
    [trivial, busy, inline_loop, comprehension_loop, generator_loop, len, Adder(1), analyze],
)
def test_score_bounds_and_class_consistency(func: Any) -> None:
    report = analyze(func)
    assert 0.0 <= report.score <= 200.0
    assert report.score == round(report.score, 2)
    expected = (
        ComplexityClass.TRIVIAL
        if report.score < 10
        else ComplexityClass.SIMPLE
        if report.score < 30
        else ComplexityClass.MODERATE
        if report.score < 60
        else ComplexityClass.COMPLEX
        if report.score < 100
        else ComplexityClass.EXTREME
    )
    assert report.complexity_class is expected


def test_huge_generated_function_is_capped_at_200() -> None:
    # Build a function that saturates every metric.
    lines = ["def huge(xs):", "    acc = 0"]
    for i in range(40):
        lines.append(f"    for a{i} in xs:")
        lines.append(f"        if a{i} > {i}:")
        lines.append(f"            acc += len(str(a{i})) + abs(a{i}) + int(a{i})")
        lines.append(f"        f{i} = lambda q: [z for z in q]")
    # 25 non-constant tuple items stay on the stack together (the compiler only
    # switches to incremental building at 30+), which saturates max_stack.
    lines.append("    return (" + ", ".join(f"acc + {i}" for i in range(25)) + ")")
    namespace: dict[str, Any] = {}
    exec("\n".join(lines), namespace)
    report = analyze(namespace["huge"])
    assert report.score == 200.0
    assert report.complexity_class is ComplexityClass.EXTREME
    assert default_weight(report) == "heavy"


def test_deterministic() -> None:
    first = analyze(busy)
    second = analyze(busy)
    assert first == second
    assert first.to_dict() == second.to_dict()


def test_to_dict_is_json_serialisable() -> None:
    for func in (busy, len):
        data = analyze(func).to_dict()
        decoded = json.loads(json.dumps(data))
        assert decoded == data
        assert decoded["complexity_class"] in {c.value for c in ComplexityClass}
        assert set(decoded) >= {
            "score",
            "instructions",
            "loops",
            "branches",
            "calls",
            "max_stack",
            "nested_code_objects",
            "names",
            "has_code",
        }


def _report(cls: ComplexityClass) -> ComplexityReport:
    return ComplexityReport(
        score=0.0,
        complexity_class=cls,
        instructions=0,
        loops=0,
        branches=0,
        calls=0,
        max_stack=0,
        nested_code_objects=0,
        names=0,
    )


@pytest.mark.parametrize(
    ("cls", "weight"),
    [
        (ComplexityClass.TRIVIAL, "light"),
        (ComplexityClass.SIMPLE, "light"),
        (ComplexityClass.MODERATE, "medium"),
        (ComplexityClass.COMPLEX, "heavy"),
        (ComplexityClass.EXTREME, "heavy"),
    ],
)
def test_default_weight_mapping(cls: ComplexityClass, weight: str) -> None:
    assert default_weight(_report(cls)) == weight


def test_enum_values_are_lowercase_names() -> None:
    for member in ComplexityClass:
        assert member.value == member.name.lower()
        assert isinstance(member, str)
