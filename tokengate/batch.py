"""``fn.map(...)``: many calls of one decorated function as a few chunk calls.

One token per call costs a future, a routing decision and a hand-off each; for
100,000 trivial calls that cost is the whole cost. ``map`` splits the
arguments into chunks and submits one call per chunk, of the operation
``"<operation_type>[map]"`` with the function's weight and lane:

* on the thread lane a worker runs a whole chunk in a loop;
* on the process lane a chunk travels to a worker process as one message
  (:meth:`~tokengate.lanes.process.ChildProcess.call_many`), so many small
  calls do not pay one round trip each.

Results come back in argument order. The first failing item (in argument
order) raises its own exception from ``await``/``get()``, as
:meth:`concurrent.futures.Executor.map` does; chunks not started yet are then
killed. Per-call policies that read a call's arguments (sticky keys, ordered
keys, retries, storage tiers, the conductor, quarantine fingerprints) see
chunks, not items: use plain calls where they matter.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, Generic, Iterable, TypeVar

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .decorator import GuardedFunction
    from .token import TaskToken

__all__ = ["MapCall", "MapChunk", "default_chunksize"]

R = TypeVar("R")

#: The most items one chunk holds by default (a chunk is one message on the process lane).
MAX_DEFAULT_CHUNK = 1024


class MapChunk:
    """The callable of a map chunk on the thread lane: calls the function once per item, in order."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or type(func).__name__
        self.__qualname__ = self.__name__ = f"{name}[map]"
        self.__module__ = getattr(func, "__module__", None) or "__main__"

    def __call__(self, items: list[tuple[Any, ...]]) -> list[Any]:
        func = self.func
        return [func(*args) for args in items]


def default_chunksize(items: int, workers: int, process: bool = False) -> int:
    """About four chunks per worker (so a slow chunk does not hold up the end), at most ``MAX_DEFAULT_CHUNK``.

    A process-lane chunk may be four times larger: each chunk is a round trip to a process.
    """
    cap = MAX_DEFAULT_CHUNK * (4 if process else 1)
    return max(1, min(cap, math.ceil(items / (4 * max(1, workers)))))


def check_chunksize(chunksize: object) -> None:
    """Refuse a chunk size that is not None or a positive int."""
    if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
        raise ConfigurationError(f"chunksize must be a positive int or None, got {chunksize!r}")


class MapCall(Generic[R]):
    """The pending results of ``fn.map(...)``: ``await`` it, or ``get()`` it from sync code.

    The chunk calls were submitted when ``map`` was called; this object only
    waits for them. Awaiting it gives the list of results in argument order.
    """

    __slots__ = ("_tokens", "_process", "_done")

    def __init__(self, tokens: list[TaskToken[Any]], process: bool) -> None:
        self._tokens = tokens
        self._process = process  # process-lane chunks come back as Outcome lists
        self._done = False

    def __len__(self) -> int:
        """How many chunk calls were submitted."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[TaskToken[Any]]:
        """The chunk calls' tokens, in argument order (for ``status()``, ``kill()``)."""
        return list(self._tokens)

    def __await__(self) -> Generator[Any, None, list[R]]:
        return self._collect().__await__()

    async def _collect(self) -> list[R]:
        results: list[R] = []
        index = 0
        try:
            for index, token in enumerate(self._tokens):
                self._extend(results, await token)
        except BaseException:
            self._kill_rest(index + 1)
            raise
        return results

    def get(self, timeout: float | None = None) -> list[R]:
        """Block until every chunk has settled; return the results (or raise the first item's error).

        Raises the builtin ``TimeoutError`` if *timeout* seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        results: list[R] = []
        index = 0
        try:
            for index, token in enumerate(self._tokens):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._extend(results, token.get(left))
        except BaseException:
            self._kill_rest(index + 1)
            raise
        return results

    def _extend(self, results: list[R], chunk: Any) -> None:
        # A process-lane chunk comes back as a lanes.Batch: values, and errors by index.
        results.extend(chunk.results() if self._process else chunk)

    def _kill_rest(self, start: int) -> None:
        # The caller is gone or failed: chunks that have not started never will.
        for token in self._tokens[start:]:
            if not token.settled:
                token.kill("map abandoned: an earlier item failed or the caller stopped waiting")


def submit_map(guarded: GuardedFunction[..., R], iterables: tuple[Iterable[Any], ...],
               chunksize: int | None) -> MapCall[R]:
    """Split the calls into chunks and submit one chunk call each (see the module docstring)."""
    check_chunksize(chunksize)
    if not iterables:
        raise ConfigurationError(f"{guarded.qualname}.map() needs at least one iterable of arguments")
    items = list(zip(*iterables))
    chunk_fn = guarded._map_function()
    if chunksize is None:
        chunksize = default_chunksize(len(items), _lane_workers(chunk_fn), guarded.lane == "process")
    tokens = [chunk_fn(items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
    return MapCall(tokens, guarded.lane == "process")


def _lane_workers(chunk_fn: GuardedFunction[..., Any]) -> int:
    from . import current

    coordinator = current.current_coordinator()
    if coordinator is None:
        return 1  # the submit below raises CoordinatorNotRunning with the usual message
    try:
        return len(coordinator._lane_router(chunk_fn).workers)
    except ConfigurationError:
        return 1  # no such lane: the submit below says so

