"""The state the coordinator's parts share, declared once for the type checker.

:class:`~tokengate.OperationsCoordinator` is assembled from
:mod:`tokengate._admission` and :mod:`tokengate._settlement` (mixins) and its own
module (lifecycle, control, statistics). Everything is initialised in
``OperationsCoordinator.__init__``; this class only declares it, plus the few
methods one part calls on another.
"""

from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING, Any, Callable, Deque

from .states import TokenState

if TYPE_CHECKING:
    from ._plan import _Plan
    from .decorator import GuardedFunction
    from .errors import Rejected, TokenKilled
    from .metrics import RateMeter, Reservoir
    from .policy import Policy
    from .routing import Router
    from .token import TaskToken
    from .worker import Worker

__all__ = ["CoordinatorBase"]


class CoordinatorBase:
    """Attribute declarations and cross-part method signatures (no behaviour)."""

    name: str
    policies: tuple[Policy, ...]
    _router: Router
    _routers: dict[str, Router]
    _refill_batch: int
    _steal_after: float
    _state_lock: threading.Lock
    _phase: str
    _gate_open: bool
    _accepting: bool
    _loop: asyncio.AbstractEventLoop | None
    _loop_thread_id: int | None
    _own_thread: threading.Thread | None
    _plans: dict[int, tuple[_Plan, _Plan | None]]
    _live: dict[int, TaskToken[Any]]
    _done: Deque[TaskToken[Any]]
    _done_paced: Deque[tuple[TaskToken[Any], Worker]]
    _pace_after: float
    _drain_scheduled: bool
    _posted_lock: threading.Lock
    _posted_queued: bool
    _accepted: int
    _settled: int
    _refused: dict[TokenState, int]
    _retries: int
    _backoffs: dict[int, asyncio.TimerHandle]
    _abandoned: int
    _by_state: dict[TokenState, int]
    _idle_waiters: list[asyncio.Future[None]]
    _queue_wait: Reservoir
    _run_time: Reservoir
    _rate: RateMeter
    _history: Deque[tuple[Any, ...]]
    _timed: int
    _run_timed: int

    # Bound appends of the latency reservoirs (set in __init__).
    _qw_samples: Callable[[float], None]
    _rt_samples: Callable[[float], None]

    # Implemented by the coordinator itself.
    def _lane_router(self, guarded: GuardedFunction[..., Any]) -> Router:
        raise NotImplementedError

    # Implemented by the admission part.
    def _admit(self, token: TaskToken[Any], plan: _Plan, *, refuse: bool) -> None: ...
    def _settle_refused(self, token: TaskToken[Any], exc: Rejected) -> None: ...
    def _route_with_hooks(self, token: TaskToken[Any], plan: _Plan, *, refuse: bool) -> None: ...

    # Implemented by the settlement part.
    def _arm_timeout(self, token: TaskToken[Any], seconds: float) -> None: ...
    def _post_settle(self, token: TaskToken[Any]) -> None: ...
    def _run_settle_hooks(self, token: TaskToken[Any], plan: _Plan) -> None: ...
    def _kill_token(self, token: TaskToken[Any], exc: TokenKilled, *, any_state: bool = False) -> bool:
        raise NotImplementedError
    def _finalize(self, token: TaskToken[Any]) -> None: ...
    def _complete(self, token: TaskToken[Any]) -> None: ...
    def _drain_done(self) -> None: ...
    def _settle_done(self, limit: int) -> bool:
        raise NotImplementedError
    def _settle_all(self) -> None: ...
