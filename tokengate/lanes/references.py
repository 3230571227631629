"""Functions travel to a worker process by reference: module + qualified name.

A worker process never receives a function object. It receives a
:class:`FunctionRef`, imports the module, walks the qualified name, and if what
it finds is a :class:`~tokengate.GuardedFunction` it calls the undecorated
function. This is what makes decorated functions work across processes
(pickling a decorated function by value fails with "not the same object as
``__main__.f``"), and it is why only functions the child can import qualify.

:func:`check_importable` says, at decoration time, whether a function
qualifies, and names the fix when it does not.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigurationError

__all__ = ["FunctionRef", "check_importable", "reference_to", "resolve_reference"]


@dataclass(frozen=True)
class FunctionRef:
    """The picklable address of a module-level function: ``module`` and ``qualname``.

    Build one with :func:`reference_to`, which checks that a worker process can
    resolve it. A class method's qualified name has a dot (``"Parser.parse"``).
    """

    module: str
    qualname: str

    @property
    def key(self) -> str:
        """``module:qualname``, the form logs and statistics use."""
        return f"{self.module}:{self.qualname}"

    def __str__(self) -> str:
        return self.key


def _describe(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__
    module = getattr(func, "__module__", None) or "?"
    return f"{module}.{name}"


def _unwrap_guarded(obj: Any) -> Any:
    # Only tokengate's own wrapper is unwrapped: other decorators that keep
    # __wrapped__ (lru_cache, a user's timing wrapper) are part of the function.
    from ..decorator import GuardedFunction

    return obj.func if isinstance(obj, GuardedFunction) else obj


def _child_start_method(start_method: str | None) -> str:
    if start_method is not None:
        return start_method
    from ._start import default_start_method

    return default_start_method()


def check_importable(func: Callable[..., Any], *, start_method: str | None = None, resolve: bool = True) -> None:
    """Check that a worker process can find *func* by module and qualified name.

    Call it when a function is declared for the process lane (at decoration
    time), so a function that cannot travel is refused at once rather than on
    its first call. A :class:`~tokengate.GuardedFunction` is checked through its
    original function.

    Args:
        func: the function (or decorated function) to check.
        start_method: how worker processes start (``"forkserver"`` or
            ``"spawn"``; default: :func:`tokengate.lanes.default_start_method`).
        resolve: also import the module and check that the name leads to
            *func*. False at decoration time, when the name is not bound yet.

    Raises:
        ConfigurationError: naming the fix, when *func* is a lambda, a function
            defined inside another function (``<locals>``), a function of
            ``__main__`` (a worker process started by forkserver or spawn cannot
            import the program's main module reliably), a callable without a
            module and qualified name (``functools.partial``, a callable
            instance), or when its module and qualified name lead to a
            different object than *func* (a name rebound after definition).
    """
    target = _unwrap_guarded(func)
    where = _describe(target)
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    if not isinstance(qualname, str) or not isinstance(module, str):
        raise ConfigurationError(
            f"{target!r} cannot run in a worker process: it has no module and qualified name to be found by "
            "(functools.partial objects and callable instances have none); wrap the call in a plain `def` at "
            "module level of an importable module")
    if qualname == "<lambda>" or qualname.endswith(".<lambda>"):
        raise ConfigurationError(
            f"{where} is a lambda and cannot run in a worker process, which finds functions by name; "
            "define it with `def` at module level of an importable module")
    if "<locals>" in qualname:
        raise ConfigurationError(
            f"{where} is defined inside another function ({qualname!r}) and cannot run in a worker process, "
            "which finds functions by module and name; move it to module level of an importable module")
    if module == "__main__" and _child_start_method(start_method) in ("spawn", "forkserver"):
        raise ConfigurationError(
            f"{where} is defined in __main__, which a worker process started by "
            f"{_child_start_method(start_method)} cannot import reliably (console-script entry points, "
            "`python -c`, notebooks); move it into an importable module and import it from your program")
    if not resolve:  # at decoration time the module-level name is not bound yet
        return
    found = _lookup(module, qualname, where)
    if found is not func and found is not target and _unwrap_guarded(found) is not target:
        raise ConfigurationError(
            f"{module}.{qualname} names {found!r}, not {target!r}: a worker process would run the other "
            "object; give the function a module-level name of its own (a decorator that does not keep "
            "__qualname__, or a name rebound after definition, causes this)")


def _lookup(module: str, qualname: str, where: str) -> Any:
    obj: Any = sys.modules.get(module)
    if obj is None:
        try:
            obj = importlib.import_module(module)
        except Exception as exc:  # an import of user code may raise anything
            raise ConfigurationError(f"{where}: module {module!r} cannot be imported: {exc}") from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(
                f"{where} cannot be found as {module}.{qualname} (no attribute {part!r}); define it at "
                "module level under its own name") from None
    return obj


def reference_to(func: Callable[..., Any], *, start_method: str | None = None) -> FunctionRef:
    """Return the :class:`FunctionRef` a worker process resolves to *func*.

    Raises:
        ConfigurationError: as :func:`check_importable`.
    """
    check_importable(func, start_method=start_method)
    target = _unwrap_guarded(func)
    return FunctionRef(target.__module__, target.__qualname__)


def resolve_reference(module: str, qualname: str) -> Callable[..., Any]:
    """Import *module*, walk *qualname* and return the callable to run (decorated ones unwrapped).

    This is what a worker process does with a reference.

    Raises:
        ImportError, AttributeError: when the module or the name is missing.
        TypeError: when the name leads to something that is not callable.
    """
    obj: Any = sys.modules.get(module)
    if obj is None:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    obj = _unwrap_guarded(obj)
    if not callable(obj):
        raise TypeError(f"{module}.{qualname} is {type(obj).__name__}, not a callable")
    return obj  # type: ignore[no-any-return]
