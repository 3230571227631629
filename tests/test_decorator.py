"""Decoration-time validation, typing-preserving wrapper behaviour, and the function registry."""

from __future__ import annotations

import functools

import pytest

from tokengate import (
    ConfigurationError,
    CoordinatorNotRunning,
    GuardedFunction,
    OperationsCoordinator,
    resolve_guarded,
    task_token_guard,
)


@task_token_guard(operation_type="resize", tags={"weight": "HEAVY", "timeout": 3})
def resize(data: bytes, width: int) -> bytes:
    """Resize an image (docstring kept)."""
    return data[:width]


def test_wrapper_keeps_name_doc_and_wrapped() -> None:
    assert isinstance(resize, GuardedFunction)
    assert resize.__name__ == "resize"
    assert resize.__doc__ == "Resize an image (docstring kept)."
    assert resize.__wrapped__(b"abcdef", 2) == b"ab"  # the original stays callable inline
    assert resize.operation_type == "resize"
    assert resize.weight == "heavy"  # case-insensitive, normalized
    assert resize.timeout == 3.0


def test_operation_type_defaults_to_module_and_qualname() -> None:
    @task_token_guard
    def local_fn() -> int:
        return 1

    assert local_fn.operation_type == f"{__name__}.test_operation_type_defaults_to_module_and_qualname.<locals>.local_fn"


def test_async_def_is_refused_with_a_fix() -> None:
    async def fetch() -> None: ...

    with pytest.raises(ConfigurationError, match="coroutine function"):
        task_token_guard(fetch)


def test_async_generator_is_refused() -> None:
    async def gen():  # type: ignore[no-untyped-def]
        yield 1

    with pytest.raises(ConfigurationError, match="async generator"):
        task_token_guard(gen)


def test_non_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="expected a sync function"):
        task_token_guard()(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tags,match",
    [
        ({"wieght": "heavy"}, "unknown tag 'wieght'; did you mean 'weight'"),
        ({"weight": "huge"}, "unknown weight 'huge'; use one of heavy, medium, light"),
        ({"weight": 3}, "weight must be a string"),
        ({"timeout": "soon"}, "expected a number of seconds"),
        ({"timeout": -1}, "positive, finite"),
        ({"timeout": float("inf")}, "positive, finite"),
        ({1: "x"}, "tag keys must be strings"),
    ],
)
def test_bad_tags_fail_at_decoration(tags: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigurationError, match=match):
        task_token_guard(tags=tags)(lambda: None)


def test_bad_tags_container_and_operation_type() -> None:
    with pytest.raises(ConfigurationError, match="tags must be a dict"):
        task_token_guard(tags=["weight"])(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="operation_type must be a non-empty string"):
        task_token_guard(operation_type="")(lambda: None)


def test_configuration_error_is_a_value_error() -> None:
    assert issubclass(ConfigurationError, ValueError)


def test_double_decoration_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="already decorated"):
        task_token_guard(resize)  # type: ignore[arg-type]


def test_call_without_a_running_coordinator_says_how_to_start_one() -> None:
    with pytest.raises(CoordinatorNotRunning, match="coordinator.start()"):
        resize(b"x", 1)


def test_partial_and_callable_objects_can_be_decorated() -> None:
    class Doubler:
        def __call__(self, x: int) -> int:
            return 2 * x

    doubled = task_token_guard(operation_type="double")(Doubler())
    part = task_token_guard(operation_type="p")(functools.partial(pow, 2))
    with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1) as c:
        assert doubled(4).get(timeout=5) == 8
        assert part(5).get(timeout=5) == 32
        assert c.stats()["counts"]["completed"] == 2


def test_methods_bind_like_functions() -> None:
    class Box:
        def __init__(self, n: int) -> None:
            self.n = n

        @task_token_guard(operation_type="box.add")
        def add(self, k: int) -> int:
            return self.n + k

    with OperationsCoordinator(policies=[], num_cores=1, workers_per_core=1):
        assert Box(3).add(4).get(timeout=5) == 7


def test_default_weight_comes_from_complexity() -> None:
    @task_token_guard
    def trivial() -> int:
        return 1

    assert trivial.weight == "light"
    assert trivial.complexity.complexity_class.value == "trivial"


def test_registry_finds_functions_by_module_and_qualname() -> None:
    assert resolve_guarded(__name__, "resize") is resize
    with pytest.raises(LookupError, match="no attribute path"):
        resolve_guarded(__name__, "nope")
    with pytest.raises(LookupError, match="cannot import module"):
        resolve_guarded("no_such_module_xyz", "f")
    with pytest.raises(LookupError, match="local function"):
        resolve_guarded(__name__, "f.<locals>.g")
