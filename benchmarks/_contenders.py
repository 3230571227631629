"""The contenders: TokenGate and the anchors a user would otherwise reach for.

All of them run a plain sync function on a thread and hand the result back to
the event loop. Every anchor gets the same thread count as the coordinator
(``num_cores × workers_per_core``) except ``asyncio.to_thread``, which always
uses the loop's default executor (its size is recorded).

=====================  ==============================================================
name                   what a call does
=====================  ==============================================================
``tokengate``          ``fn(*args)`` on a decorated function → a TaskToken (a Future)
``run_in_executor``    ``loop.run_in_executor(ThreadPoolExecutor(T), fn, *args)``
``to_thread``          ``asyncio.to_thread(fn, *args)`` (default executor, context copy)
``anyio``              ``anyio.to_thread.run_sync(fn, *args, limiter=CapacityLimiter(T))``
                       (FastAPI/Starlette's path for ``def`` endpoints)
``cf_wrap_future``     ``asyncio.wrap_future(ThreadPoolExecutor(T).submit(fn, *args))``
=====================  ==============================================================

Thread: create, start, call and stop on one event loop's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import os
from typing import Any, Awaitable, Callable, Sequence

from tokengate import GuardedFunction, OperationsCoordinator

__all__ = ["Contender", "ALL_CONTENDERS", "ANCHORS", "make_contenders", "thread_count", "parse_contenders"]

ANCHORS = ("run_in_executor", "to_thread", "anyio", "cf_wrap_future")
ALL_CONTENDERS = ("tokengate", *ANCHORS)


class Contender:
    """One way to run sync work from async code. Subclasses implement ``submit``."""

    name = "?"
    note = ""

    def __init__(self, threads: int) -> None:
        self.threads: int | None = threads

    async def start(self) -> None:
        """Create pools; then run one call so lazily created threads exist before timing."""

    async def stop(self) -> None:
        """Release pools and threads."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        """Run the plain function *fn* on a thread; return an awaitable for its result."""
        raise NotImplementedError

    def call(self, guarded: GuardedFunction[..., Any], *args: Any) -> Awaitable[Any]:
        """Run one call of a decorated function the contender's way (anchors call the plain function)."""
        return self.submit(guarded.func, *args)

    def describe(self) -> dict[str, Any]:
        return {"threads": self.threads, "note": self.note}


class TokenGateContender(Contender):
    name = "tokengate"
    note = "decorated function; coordinator attached to the running loop"

    def __init__(self, threads: int, coordinator_kwargs: dict[str, Any]) -> None:
        super().__init__(threads)
        self.kwargs = dict(coordinator_kwargs)
        self.coordinator: OperationsCoordinator | None = None
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        self.coordinator = await self._stack.enter_async_context(OperationsCoordinator(**self.kwargs))

    async def stop(self) -> None:
        await self._stack.aclose()

    def call(self, guarded: GuardedFunction[..., Any], *args: Any) -> Awaitable[Any]:
        return guarded(*args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        raise TypeError("tokengate runs decorated functions only; use call()")

    def describe(self) -> dict[str, Any]:
        c = self.coordinator
        info: dict[str, Any] = {"threads": self.threads, "note": self.note, "coordinator_kwargs": self.kwargs}
        if c is not None:
            info.update(num_cores=c.num_cores, workers_per_core=c.workers_per_core,
                        policies=[p.name for p in c.policies], routing=c.routing.to_dict())
        return info


class RunInExecutor(Contender):
    name = "run_in_executor"
    note = "loop.run_in_executor on a ThreadPoolExecutor with the coordinator's thread count"

    async def start(self) -> None:
        assert self.threads is not None
        self.pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="bench-rie")
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        self.pool.shutdown(wait=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return self.loop.run_in_executor(self.pool, fn, *args)


class ToThread(Contender):
    name = "to_thread"
    note = "asyncio.to_thread: the loop's default executor, min(32, cpu_count + 4) threads"

    def __init__(self, threads: int) -> None:
        super().__init__(threads)
        self.threads = None  # known once the default executor exists

    async def start(self) -> None:
        await asyncio.to_thread(int)  # creates the default executor
        executor = getattr(asyncio.get_running_loop(), "_default_executor", None)
        self.threads = getattr(executor, "_max_workers", None) or min(32, (os.cpu_count() or 1) + 4)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.to_thread(fn, *args)


class AnyioToThread(Contender):
    name = "anyio"
    note = "anyio.to_thread.run_sync with CapacityLimiter(threads): FastAPI's path for def endpoints"

    async def start(self) -> None:
        import anyio
        import anyio.to_thread

        self._run_sync = anyio.to_thread.run_sync
        self.limiter = anyio.CapacityLimiter(self.threads or 1)
        self.anyio_version = getattr(anyio, "__version__", None)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return self._run_sync(fn, *args, limiter=self.limiter)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "limiter_total_tokens": self.threads}


class CfWrapFuture(Contender):
    name = "cf_wrap_future"
    note = "bare concurrent.futures submit + asyncio.wrap_future (same thread count)"

    async def start(self) -> None:
        assert self.threads is not None
        self.pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="bench-cf")

    async def stop(self) -> None:
        self.pool.shutdown(wait=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.wrap_future(self.pool.submit(fn, *args))


def thread_count(coordinator_kwargs: dict[str, Any]) -> int:
    """num_cores × workers_per_core of a coordinator built with these options (not started)."""
    probe = OperationsCoordinator(**coordinator_kwargs)
    return probe.num_cores * probe.workers_per_core


def parse_contenders(text: str | None, default: Sequence[str] = ALL_CONTENDERS) -> tuple[str, ...]:
    """``"tokengate,anyio"`` → names, validated; ``tokengate`` and ``run_in_executor`` are always kept."""
    if not text:
        return tuple(default)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {unknown!r}; choose from {', '.join(ALL_CONTENDERS)}")
    chosen = {*names, "tokengate", "run_in_executor"}
    return tuple(n for n in ALL_CONTENDERS if n in chosen)


def make_contenders(names: Sequence[str], coordinator_kwargs: dict[str, Any]) -> list[Contender]:
    """Build the named contenders with the coordinator's thread count."""
    threads = thread_count(coordinator_kwargs)
    factories: dict[str, Callable[[], Contender]] = {
        "tokengate": lambda: TokenGateContender(threads, coordinator_kwargs),
        "run_in_executor": lambda: RunInExecutor(threads),
        "to_thread": lambda: ToThread(threads),
        "anyio": lambda: AnyioToThread(threads),
        "cf_wrap_future": lambda: CfWrapFuture(threads),
    }
    return [factories[n]() for n in names]


@contextlib.asynccontextmanager
async def started(contenders: Sequence[Contender]) -> Any:
    """Start every contender; stop them all on the way out (even after an error)."""
    done: list[Contender] = []
    try:
        for c in contenders:
            await c.start()
            done.append(c)
        yield contenders
    finally:
        for c in reversed(done):
            await c.stop()
