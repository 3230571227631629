"""Virtual time for the coordinator's event loop: timeouts fire when a test says so, not when the scheduler does.

A token's ``timeout`` tag is a timer on the coordinator's loop (``loop.call_later``).
A test that needs "the call started, *then* it timed out" used to give the call a
50 ms timeout and hope a worker started it before then; on a loaded machine it did
not. Here the loop's clock is the real monotonic clock plus an offset that only
moves when the test calls :meth:`VirtualTimeLoop.advance`: give the call a timeout
no test ever reaches in real time (``NEVER``), wait (on an event) until the call is
where the test wants it, then advance the clock past the timeout.

``autojump=True`` makes the loop move its clock to the next timer whenever it has
nothing else to do, like trio's ``MockClock(autojump_threshold=0)``: a wait of
minutes takes no real time, so a test can measure how long the coordinator waits
(in virtual seconds) without racing the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import threading
import time
from typing import Any, Coroutine, Iterator, TypeVar
from unittest import mock

from tokengate import OperationsCoordinator, TaskToken, TokenState

__all__ = ["NEVER", "VirtualTimeLoop", "run_virtual", "virtual_loops", "start_virtual", "expire",
           "wait_until_running", "wait_for_state"]

T = TypeVar("T")

#: A timeout no test reaches in real time; it fires only when the clock is advanced past it.
NEVER = 3600.0
_WAIT = 10.0  # real seconds any helper here waits at most


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """A selector that, instead of sleeping until the next timer, moves its loop's clock there."""

    loop: VirtualTimeLoop | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout is None or timeout <= 0 or self.loop is None:
            return ready if ready or timeout == 0 else super().select(timeout)
        self.loop.offset += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is real time plus ``offset``.

    Thread: ``advance`` from any thread; everything else as for any event loop.
    """

    def __init__(self, *, autojump: bool = False) -> None:
        selector = _JumpingSelector() if autojump else None
        super().__init__(selector)
        if selector is not None:
            selector.loop = self
        self.offset = 0.0  # written on the loop thread only (advance hops there)

    def time(self) -> float:
        return super().time() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward by *seconds*; from another thread, return once the timers now due have run."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        if _running_loop() is self:
            self.offset += seconds  # the timers now due run at the next iteration
            return
        done = threading.Event()

        def jump() -> None:
            self.offset += seconds
            # Scheduled at "now": it runs after every timer that is due (they sort earlier).
            self.call_at(self.time(), done.set)

        self.call_soon_threadsafe(jump)
        assert done.wait(_WAIT), "the loop did not run the advance"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def run_virtual(coro: Coroutine[Any, Any, T], *, autojump: bool = False) -> T:
    """``asyncio.run(coro)`` on a :class:`VirtualTimeLoop` (Python 3.10 has no ``loop_factory``)."""
    loop = VirtualTimeLoop(autojump=autojump)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


@contextlib.contextmanager
def virtual_loops() -> Iterator[None]:
    """While active, ``asyncio.new_event_loop()`` (what ``coordinator.start()`` calls) makes a VirtualTimeLoop."""
    with mock.patch.object(asyncio, "new_event_loop", VirtualTimeLoop):
        yield


def start_virtual(coordinator: OperationsCoordinator) -> OperationsCoordinator:
    """Start *coordinator* standalone on a :class:`VirtualTimeLoop`."""
    with virtual_loops():
        coordinator.start()
    assert isinstance(coordinator.loop, VirtualTimeLoop), "start() no longer makes its loop with new_event_loop()"
    return coordinator


def expire(coordinator: OperationsCoordinator, token: TaskToken[Any]) -> None:
    """Advance *coordinator*'s virtual clock past any ``timeout`` tag; return once due timers ran."""
    loop = coordinator.loop
    assert isinstance(loop, VirtualTimeLoop), "start the coordinator with start_virtual()"
    loop.advance(NEVER + 1)
    assert token.done(), f"{token!r} did not settle when its timeout passed"


def wait_for_state(token: TaskToken[Any], state: TokenState, timeout: float = _WAIT) -> None:
    """Poll (bounded) until *token* is in *state*: for states no event announces."""
    deadline = time.monotonic() + timeout
    while token.state is not state:
        assert time.monotonic() < deadline, f"{token!r} never reached {state.name} (is {token.state.name})"
        time.sleep(0.001)


def wait_until_running(token: TaskToken[Any], timeout: float = _WAIT) -> None:
    """Wait (bounded) until *token* is executing on a worker."""
    wait_for_state(token, TokenState.EXECUTING, timeout)
