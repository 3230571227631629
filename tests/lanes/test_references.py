"""check_importable / reference_to: which functions can travel to a worker process, and the fix named when not."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from tokengate import ConfigurationError, task_token_guard
from tokengate.lanes import FunctionRef, check_importable, reference_to, resolve_reference

from . import child_functions as cf


def module_level(x: int) -> int:
    return x


class Parser:
    def parse(self, text: str) -> str:
        return text

    @staticmethod
    def static(x: int) -> int:
        return x


@task_token_guard(operation_type="lanes.refs.decorated")
def decorated(x: int) -> int:
    return x + 1


def test_module_level_function_gives_its_module_and_qualname() -> None:
    ref = reference_to(module_level)
    assert ref == FunctionRef(module_level.__module__, "module_level")
    assert ref.key == f"{module_level.__module__}:module_level"
    assert resolve_reference(ref.module, ref.qualname) is module_level


def test_decorated_function_travels_as_the_original_and_resolves_unwrapped() -> None:
    ref = reference_to(decorated)
    assert ref.qualname == "decorated"
    assert resolve_reference(ref.module, ref.qualname) is decorated.__wrapped__


def test_class_members_resolve_by_dotted_qualname() -> None:
    assert reference_to(Parser.parse).qualname == "Parser.parse"
    assert resolve_reference(__name__, "Parser.static")(4) == 4


def test_lambda_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigurationError, match=r"lambda.*define it with `def` at module level"):
        check_importable(lambda x: x)


def test_local_function_is_refused_with_the_fix() -> None:
    def local(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match=r"<locals>.*move it to module level"):
        check_importable(local)


def test_decorated_local_function_is_refused() -> None:
    @task_token_guard(operation_type="lanes.refs.local")
    def local(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="<locals>"):
        check_importable(local)


def _in_main(x: int) -> int:
    return x


def test_main_module_function_is_refused_under_spawn_and_forkserver() -> None:
    func: Any = functools.wraps(_in_main)(lambda x: x)  # a function object whose __module__ we may change
    func.__module__ = "__main__"
    func.__qualname__ = "handler"
    for method in ("spawn", "forkserver"):
        with pytest.raises(ConfigurationError, match=r"__main__.*move it into an importable module"):
            check_importable(func, start_method=method)


def test_partial_and_callable_instance_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="no module and qualified name"):
        check_importable(functools.partial(module_level, 1))

    class Callable:
        def __call__(self) -> None: ...

    with pytest.raises(ConfigurationError, match="no module and qualified name"):
        check_importable(Callable())


def _rebound(x: int) -> int:
    return x


_original_rebound = _rebound
_rebound = module_level  # noqa: F811 - the name now leads elsewhere


def test_a_name_that_leads_to_another_object_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="not the same|names .* not"):
        check_importable(_original_rebound)


def test_missing_attribute_is_refused() -> None:
    def ghost() -> None: ...

    ghost.__qualname__ = "no_such_function"
    with pytest.raises(ConfigurationError, match="no attribute 'no_such_function'"):
        check_importable(ghost)


def test_the_child_functions_module_is_importable() -> None:
    check_importable(cf.add)
    check_importable(cf.guarded_double)
