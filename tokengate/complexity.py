"""Static complexity scoring for decorated functions.

A :class:`ComplexityReport` is computed once from a function's bytecode (it
never runs the function) and is used to pick a default weight class when the
caller did not name one. The numbers are heuristics: bytecode differs between
CPython versions (3.11 added inline caches and ``RESUME``, 3.12 inlined list,
set and dict comprehensions into their parent), so a score can move by a few
points between interpreters but the class boundaries are wide enough that
this rarely changes the class.

Metrics (summed over the function's code object and every code object nested
in it -- comprehensions, lambdas, generator expressions, inner functions):

* ``instructions`` -- real instructions reported by :func:`dis.get_instructions`
  (never ``len(co_code)``, which counts 3.11+ inline cache slots). Pure
  bookkeeping opcodes (``CACHE``, ``EXTENDED_ARG``, ``RESUME``, ``NOP``) are
  excluded so the count is comparable across versions.
* ``loops`` -- the number of distinct *loop heads* per code object, where a
  loop head is the target of a backward jump (any jump instruction whose
  target offset is at or before its own offset). This one definition works on
  3.10 (``JUMP_ABSOLUTE``/``POP_JUMP_IF_TRUE`` backwards), 3.11
  (``JUMP_BACKWARD``/``POP_JUMP_BACKWARD_IF_*``) and 3.12-3.13
  (``JUMP_BACKWARD``). Counting targets rather than jumps means ``continue``
  statements do not inflate the count. ``JUMP_BACKWARD_NO_INTERRUPT`` is
  ignored: on 3.11+ it implements ``await``/``yield from`` resumption, not a
  user loop, and 3.10 has no equivalent jump.
* ``branches`` -- conditional jumps: any opcode whose name contains
  ``POP_JUMP`` or ``JUMP_IF``.
* ``calls`` -- call sites: ``CALL``, ``CALL_KW``, ``CALL_FUNCTION``,
  ``CALL_FUNCTION_KW``, ``CALL_FUNCTION_EX``, ``CALL_METHOD`` (3.11's
  ``PRECALL`` is half of a call and 3.12's ``CALL_INTRINSIC_*`` are interpreter
  internals, so neither is counted).
* ``max_stack`` -- the largest ``co_stacksize`` of any of the code objects.
* ``nested_code_objects`` -- how many code objects are nested (recursively).
* ``names`` -- size of the union of ``co_names`` across all code objects.

Score formula::

    score = 200 * (0.30 * min(1, instructions / 400)
                 + 0.20 * min(1, loops / 6)
                 + 0.15 * min(1, calls / 25)
                 + 0.15 * min(1, branches / 15)
                 + 0.10 * min(1, max_stack / 20)
                 + 0.10 * min(1, nested_code_objects / 5))

rounded to 2 decimals, so it always lies in ``[0, 200]``. Classes:
``score < 10`` TRIVIAL, ``< 30`` SIMPLE, ``< 60`` MODERATE, ``< 100`` COMPLEX,
otherwise EXTREME.
"""

from __future__ import annotations

import dis
import enum
import functools
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ComplexityClass",
    "ComplexityReport",
    "analyze",
    "default_weight",
]

logger = logging.getLogger(__name__)


class ComplexityClass(str, enum.Enum):
    """Coarse complexity bucket derived from :attr:`ComplexityReport.score`."""

    TRIVIAL = "trivial"
    SIMPLE = "simple"
    MODERATE = "moderate"
    COMPLEX = "complex"
    EXTREME = "extreme"


@dataclass(frozen=True)
class ComplexityReport:
    """Result of :func:`analyze`; immutable so it can be cached and shared.

    ``has_code`` is False when no Python code object could be found (builtins,
    C extension functions); such reports are always TRIVIAL with score 0.
    """

    score: float
    complexity_class: ComplexityClass
    instructions: int
    loops: int
    branches: int
    calls: int
    max_stack: int
    nested_code_objects: int
    names: int
    has_code: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (the class as its string value)."""
        return {
            "score": self.score,
            "complexity_class": self.complexity_class.value,
            "instructions": self.instructions,
            "loops": self.loops,
            "branches": self.branches,
            "calls": self.calls,
            "max_stack": self.max_stack,
            "nested_code_objects": self.nested_code_objects,
            "names": self.names,
            "has_code": self.has_code,
        }


# (cap, weight) per metric; the weights sum to 1.0 so the score tops out at 200.
_MAX_SCORE = 200.0
_INSTRUCTIONS = (400.0, 0.30)
_LOOPS = (6.0, 0.20)
_CALLS = (25.0, 0.15)
_BRANCHES = (15.0, 0.15)
_MAX_STACK = (20.0, 0.10)
_NESTED = (5.0, 0.10)

# Upper score bounds (exclusive) for each class, checked in order.
_CLASS_BOUNDS: tuple[tuple[float, ComplexityClass], ...] = (
    (10.0, ComplexityClass.TRIVIAL),
    (30.0, ComplexityClass.SIMPLE),
    (60.0, ComplexityClass.MODERATE),
    (100.0, ComplexityClass.COMPLEX),
)

_IGNORED_OPNAMES = frozenset({"CACHE", "EXTENDED_ARG", "RESUME", "NOP"})
_CALL_OPNAMES = frozenset(
    {
        "CALL",
        "CALL_KW",
        "CALL_FUNCTION",
        "CALL_FUNCTION_KW",
        "CALL_FUNCTION_EX",
        "CALL_METHOD",
    }
)
# hasjabs is empty on 3.13 (all jumps relative) and hasjrel is kept as an alias
# of hasjump there; the opname check below covers any future renames.
_JUMP_OPCODES = frozenset(dis.hasjrel) | frozenset(dis.hasjabs)
# Bounds the unwrap loop: a Mock or a pathological __wrapped__ chain could
# otherwise produce fresh objects forever.
_MAX_UNWRAP_STEPS = 64

_NO_CODE_REPORT = ComplexityReport(
    score=0.0,
    complexity_class=ComplexityClass.TRIVIAL,
    instructions=0,
    loops=0,
    branches=0,
    calls=0,
    max_stack=0,
    nested_code_objects=0,
    names=0,
    has_code=False,
)


def _ratio(value: int, metric: tuple[float, float]) -> float:
    cap, weight = metric
    return weight * min(1.0, max(0.0, value / cap))


def _classify(score: float) -> ComplexityClass:
    for bound, cls in _CLASS_BOUNDS:
        if score < bound:
            return cls
    return ComplexityClass.EXTREME


def _find_code(obj: object) -> types.CodeType | None:
    """Follow wrappers until a Python code object is found, or give up."""
    for _ in range(_MAX_UNWRAP_STEPS):
        if isinstance(obj, functools.partial):
            obj = obj.func
            continue
        if isinstance(obj, (types.MethodType, classmethod, staticmethod)):
            obj = obj.__func__
            continue
        # Decorators built with functools.wraps expose the original function;
        # the original's body is what runs the real work, not the thin wrapper.
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None and wrapped is not obj:
            obj = wrapped
            continue
        code = getattr(obj, "__code__", None)
        if isinstance(code, types.CodeType):
            return code
        if isinstance(obj, type):
            # Calling a class runs its __init__; slot wrappers (C __init__)
            # fail the FunctionType check and give up.
            init = getattr(obj, "__init__", None)
            if isinstance(init, types.FunctionType):
                obj = init
                continue
            return None
        # Callable instance: analyse the class-level __call__. Only follow
        # Python functions -- C slot wrappers have no code and would otherwise
        # chain through ever-new method-wrapper objects.
        call = getattr(type(obj), "__call__", None)
        if isinstance(call, types.FunctionType):
            obj = call
            continue
        return None
    return None


@functools.lru_cache(maxsize=1024)
def _analyze_code(root: types.CodeType) -> ComplexityReport:
    """Analyse ``root`` and all nested code objects; cached per code object."""
    instructions = loops = branches = calls = nested = max_stack = 0
    names: set[str] = set()
    # Explicit stack instead of recursion: deeply nested generated code must
    # not hit the recursion limit.
    pending: list[types.CodeType] = [root]
    while pending:
        code = pending.pop()
        max_stack = max(max_stack, code.co_stacksize)
        names.update(code.co_names)
        loop_heads: set[int] = set()
        for ins in dis.get_instructions(code):
            opname = ins.opname
            if opname in _IGNORED_OPNAMES:
                continue
            instructions += 1
            if opname in _CALL_OPNAMES:
                calls += 1
            if "POP_JUMP" in opname or "JUMP_IF" in opname:
                branches += 1
            is_jump = ins.opcode in _JUMP_OPCODES or "JUMP" in opname
            if (
                is_jump
                and opname != "JUMP_BACKWARD_NO_INTERRUPT"
                and isinstance(ins.argval, int)
                and ins.argval <= ins.offset
            ):
                loop_heads.add(ins.argval)
        loops += len(loop_heads)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                nested += 1
                pending.append(const)

    raw = _MAX_SCORE * (
        _ratio(instructions, _INSTRUCTIONS)
        + _ratio(loops, _LOOPS)
        + _ratio(calls, _CALLS)
        + _ratio(branches, _BRANCHES)
        + _ratio(max_stack, _MAX_STACK)
        + _ratio(nested, _NESTED)
    )
    # Clamp guards against float rounding nudging the sum past the cap.
    score = round(min(_MAX_SCORE, max(0.0, raw)), 2)
    return ComplexityReport(
        score=score,
        complexity_class=_classify(score),
        instructions=instructions,
        loops=loops,
        branches=branches,
        calls=calls,
        max_stack=max_stack,
        nested_code_objects=nested,
        names=len(names),
    )


def analyze(func: Callable[..., object]) -> ComplexityReport:
    """Statically score ``func`` from its bytecode; never calls it.

    ``functools.partial`` objects, ``__wrapped__`` chains (``functools.wraps``
    decorators), bound methods, class/static methods, callable instances
    (their class's ``__call__``) and classes (their ``__init__``) are unwrapped
    first. When no Python code object can be found -- builtins such as
    ``len``, C extension functions -- a TRIVIAL report with score 0 and
    ``has_code=False`` is returned. Results are cached per code object, so
    analysing the same function again is cheap and returns an equal report.
    This function never raises for a callable: unexpected failures are logged
    and yield the ``has_code=False`` report.
    """
    try:
        code = _find_code(func)
    except Exception:  # hostile __getattr__ etc.; scoring must never break a decorator
        logger.debug("could not locate code object for %r", func, exc_info=True)
        return _NO_CODE_REPORT
    if code is None:
        return _NO_CODE_REPORT
    try:
        return _analyze_code(code)
    except Exception:  # dis on exotic/foreign bytecode; fall back rather than fail
        logger.warning(
            "complexity analysis failed for %s; treating as trivial",
            getattr(code, "co_qualname", code.co_name),
            exc_info=True,
        )
        return _NO_CODE_REPORT


def default_weight(report: ComplexityReport) -> str:
    """Map a report to the default weight-class name used when none is given.

    Mapping: TRIVIAL and SIMPLE -> ``"light"``; MODERATE -> ``"medium"``;
    COMPLEX and EXTREME -> ``"heavy"``.
    """
    cls = report.complexity_class
    if cls in (ComplexityClass.TRIVIAL, ComplexityClass.SIMPLE):
        return "light"
    if cls is ComplexityClass.MODERATE:
        return "medium"
    return "heavy"
