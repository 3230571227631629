"""``@task_token_guard``: turn a plain sync function into one whose calls return tokens.

Decorated functions are recorded in a small process-wide table keyed by
``module:qualname`` (weakly, so functions defined in tests go away) and can be
found again after a restart by importing their module: the quarantine uses this
to re-run a held call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import pickle
import types
import weakref
from typing import Any, Callable, Generic, Iterable, Mapping, TypeVar, overload

from .batch import MapCall, MapChunk, submit_map
from .complexity import ComplexityReport, analyze, default_weight
from .lanes.references import FunctionRef, check_importable
from .errors import ConfigurationError, CoordinatorNotRunning
from .tags import check_tags, validate_tags

from typing import ParamSpec

from . import current as _current
from .token import TaskToken

__all__ = ["task_token_guard", "GuardedFunction", "resolve_guarded"]

P = ParamSpec("P")
R = TypeVar("R")

_uids = itertools.count(1)


def _lane_of(tags: Mapping[str, Any]) -> str:
    lane = tags.get("lane")
    pool = tags.get("process_pool")
    if pool is not None and lane is not None and (lane == "process") != pool:
        raise ConfigurationError(f"tags lane={lane!r} and process_pool={pool!r} disagree; give one of them")
    if lane is None:
        lane = "process" if pool else "thread"
    return str(lane)
_REGISTRY: "weakref.WeakValueDictionary[str, GuardedFunction[Any, Any]]" = weakref.WeakValueDictionary()


class GuardedFunction(Generic[P, R]):
    """A decorated function. Calling it submits the call and returns a ``TaskToken[R]`` at once.

    The original stays available as ``__wrapped__`` (run inline, e.g. in unit
    tests). ``operation_type``, ``tags``, ``weight`` and ``complexity`` describe
    how calls are routed.

    Raises (on call):
        CoordinatorNotRunning: no coordinator is running; start one first.
        Rejected: a subclass, when the coordinator refuses the call (see errors).
    """

    def __init__(self, func: Callable[P, R], operation_type: str, tags: dict[str, Any],
                 *, map_of: GuardedFunction[..., Any] | None = None) -> None:
        functools.update_wrapper(self, func)
        self.__wrapped__ = func
        self.func: Callable[P, R] = func
        self.operation_type = operation_type
        self.tags: Mapping[str, Any] = types.MappingProxyType(tags)
        self.complexity: ComplexityReport = analyze(func)
        self.weight: str = str(tags.get("weight") or default_weight(self.complexity))
        self.timeout: float | None = tags.get("timeout")
        self.lane: str = _lane_of(tags)
        # How a worker process finds the function (process lane only): its
        # module and qualified name, checked here; whether the name is bound
        # to this function is checked at its first call (it is not bound yet).
        self.reference: FunctionRef | None = None
        # For the chunk calls of map(): the function whose items a chunk holds.
        self.map_of = map_of
        self._map_fn: GuardedFunction[..., Any] | None = None
        if map_of is not None:
            self.reference = map_of.reference  # a process-lane chunk runs the original, item by item
        elif self.lane == "process":
            check_importable(func, resolve=False)
            self.reference = FunctionRef(func.__module__, func.__qualname__)
        elif self.lane == "dask":  # travels by cloudpickle (by value if need be): only the library is checked
            from .lanes.dask_config import require_distributed

            require_distributed(f"{operation_type!r} (tags lane='dask')")
        self.module: str = getattr(func, "__module__", None) or "__main__"
        self.qualname: str = str(getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func)))
        # Policies cache per-function decisions here (e.g. parsed retry settings).
        self.policy_cache: dict[str, Any] = {}
        # Process-unique number: what coordinators key their per-function plans by,
        # so that caching a plan never keeps the function alive.
        self._uid: int = next(_uids)

    @property
    def key(self) -> str:
        """``module:qualname``: how the function is found again after a restart."""
        return f"{self.module}:{self.qualname}"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> TaskToken[R]:
        # Inlined current.for_this_thread(): the worker's own coordinator, else the newest.
        coordinator = _current._worker_local.coordinator or (_current._stack[-1] if _current._stack else None)
        if coordinator is None:
            raise CoordinatorNotRunning(
                f"{self.qualname}() was called but no OperationsCoordinator is running; "
                "start one first: `async with OperationsCoordinator():` in async code, "
                "or `coordinator.start()` from sync code"
            )
        return coordinator.submit(self, args, kwargs)

    def map(self, *iterables: Iterable[Any], chunksize: int | None = None) -> MapCall[R]:
        """Call the function once per item of *iterables* (zipped, as the builtin ``map``); ``await`` the results.

        The calls are submitted now, in chunks of *chunksize* items (default:
        about four chunks per worker of the function's lane, at most 1,024),
        one call of the operation ``"<operation_type>[map]"`` per chunk; on the
        process lane a chunk is one message to a worker process. ``await
        fn.map(xs)`` (or ``.get()`` from sync code) returns the results in
        order, or raises the first failing item's exception. See
        :mod:`tokengate.batch`.

        Raises:
            ConfigurationError: a bad *chunksize*, or no iterable.
            CoordinatorNotRunning, Rejected: as a plain call does.
        """
        return submit_map(self, iterables, chunksize)

    def _map_function(self) -> GuardedFunction[..., list[Any]]:
        """The decorated chunk runner behind :meth:`map` (made once per function)."""
        fn = self._map_fn
        if fn is None:
            tags = {k: v for k, v in self.tags.items() if k in ("weight", "lane", "process_pool")}
            tags["weight"] = self.weight
            fn = self._map_fn = GuardedFunction(MapChunk(self.func), f"{self.operation_type}[map]", tags,
                                                map_of=self)
        return fn

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled as its import path, like a plain function: unpickling finds the
        # decorated function again (in a worker process, for instance) instead of
        # failing with "not the same object as __main__.f".
        if "<locals>" in self.qualname or self.map_of is not None:
            raise pickle.PicklingError(f"{self.key} cannot be pickled: it cannot be found by its import path")
        return (resolve_guarded, (self.module, self.qualname))

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # Support decorating methods: bind like a function would.
        if instance is None:
            return self
        return types.MethodType(self, instance)

    def __repr__(self) -> str:
        return f"<guarded {self.key} operation_type={self.operation_type!r} weight={self.weight}>"


@overload
def task_token_guard(func: Callable[P, R], /) -> GuardedFunction[P, R]: ...


@overload
def task_token_guard(
    *, operation_type: str | None = None, tags: Mapping[str, Any] | None = None
) -> Callable[[Callable[P, R]], GuardedFunction[P, R]]: ...


def task_token_guard(
    func: Callable[P, R] | None = None,
    /,
    *,
    operation_type: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> GuardedFunction[P, R] | Callable[[Callable[P, R]], GuardedFunction[P, R]]:
    """Decorate a sync function so each call returns a :class:`TaskToken` at once.

    ``token = resize(data, 200)`` submits the call to the current coordinator
    immediately; ``await token`` (or ``token.get()``) only waits for it. A
    token that is never awaited still runs.

    Args:
        operation_type: A label for statistics, pause/kill and reputation.
            Several functions may share one. Defaults to ``module.qualname``.
        tags: Routing and policy options, validated now. Core tags: ``weight``
            (``heavy`` | ``medium`` | ``light``; default inferred from the
            function's static complexity) and ``timeout`` (seconds). Policies
            declare more (see ``tokengate.declared_tags()``).

    Raises:
        ConfigurationError: for an ``async def`` function, an async generator,
            a non-callable, an unknown tag key, a bad tag value, or a tag
            value that does not fit the function (e.g. a ``sticky_key`` that
            names no parameter of it).
    """

    def decorate(f: Callable[P, R]) -> GuardedFunction[P, R]:
        if isinstance(f, GuardedFunction):
            raise ConfigurationError(f"{f!r} is already decorated with task_token_guard")
        if not callable(f):
            raise ConfigurationError(f"task_token_guard expected a sync function, got {type(f).__name__} {f!r}")
        target = inspect.unwrap(f) if hasattr(f, "__wrapped__") else f
        if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(f):
            raise ConfigurationError(
                f"task_token_guard expected a sync function, but {f!r} is a coroutine function; "
                "await it directly instead, or make it a plain `def`"
            )
        if inspect.isasyncgenfunction(target) or inspect.isasyncgenfunction(f):
            raise ConfigurationError(f"task_token_guard expected a sync function, but {f!r} is an async generator")
        name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__
        module = getattr(f, "__module__", None) or "__main__"
        if operation_type is not None and (not isinstance(operation_type, str) or not operation_type.strip()):
            raise ConfigurationError(f"operation_type must be a non-empty string, got {operation_type!r}")
        op = operation_type if operation_type is not None else f"{module}.{name}"
        normalized = validate_tags(tags, where=f"task_token_guard({op!r})")
        check_tags(f, normalized, where=f"task_token_guard({op!r})")  # values that must fit the function
        guarded = GuardedFunction(f, op, normalized)
        _REGISTRY[guarded.key] = guarded
        return guarded

    if func is not None:
        return decorate(func)
    return decorate


def resolve_guarded(module: str, qualname: str) -> GuardedFunction[Any, Any]:
    """Find a decorated function by module and qualified name, importing the module if needed.

    Raises:
        LookupError: if the module or the name cannot be found, or is not decorated.
    """
    found = _REGISTRY.get(f"{module}:{qualname}")
    if found is not None:
        return found
    if "<locals>" in qualname:
        raise LookupError(f"{module}:{qualname} is a local function and cannot be found again after a restart")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise LookupError(f"cannot import module {module!r} to find {qualname!r}: {exc}") from exc
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LookupError(f"{module!r} has no attribute path {qualname!r}") from None
    if not isinstance(obj, GuardedFunction):
        raise LookupError(f"{module}:{qualname} is not decorated with task_token_guard")
    return obj
