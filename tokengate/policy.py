"""The hook interface through which safety and locality policies join the token lifecycle.

Modeled on dramatiq's middleware: a policy subclasses :class:`Policy` and
overrides only the hooks it needs; the coordinator calls just the overridden
ones, so an unused hook costs nothing on the hot path.

Order: ``before_submit``, ``admit``, ``pick_core`` and ``on_routed`` run in
the order the policies were given; ``after_run`` and ``on_settle`` in reverse
(an onion, like dramatiq's ``after_*`` hooks).

Threads and locks:

* ``before_submit`` runs on the thread that made the call (an event loop, a
  worker thread for nested calls, or plain sync code). It may refuse the call
  by raising a :class:`~tokengate.errors.Rejected` subclass.
* ``admit`` runs on the submitting thread (or the loop, for retries and
  releases). Returning False means "I hold this token": the policy must later
  hand it back with ``coordinator.release_held(token)``.
* ``pick_core`` and ``on_routed`` run under the coordinator's routing lock:
  keep them O(1), never block, never call back into the coordinator. A policy
  that routes only calls it marked (set ``token.policy_data`` in
  ``before_submit``) sets ``route_marked_only = True``, so every other call
  skips its routing hooks entirely (the conductor does this).
* ``after_run`` and ``on_settle`` run on the coordinator's event-loop thread,
  except ``on_settle`` for a call refused at submission, which runs on the
  submitting thread.
* ``held_behind`` runs on a worker thread that waits (``get()``) on a call the
  policy holds, without the routing lock.

Because hooks run on several threads, a policy guards its own state with its
own lock, and never calls user code while holding it. Any exception other than
a refusal is logged with the policy's name and contained: a bug in a policy
never fails a call.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

from .states import TokenState

if TYPE_CHECKING:
    from .decorator import GuardedFunction
    from .token import TaskToken

__all__ = ["Policy", "PolicyHost", "HOOKS"]


class PolicyHost(Protocol):
    """What a policy may use of the coordinator it is installed in: this, and nothing else.

    ``on_start`` and ``on_stop`` receive it. Policies never reach into the
    engine (routing, workers, settlement): what they need of a call they read
    from the token's public fields (``outcome``, ``is_error``, ``state``,
    ``tags``, ``policy_data``...), and a call they held they hand back with
    ``release_held``. Keeping this narrow is what lets lanes and the engine
    change without touching the policies.
    """

    @property
    def name(self) -> str: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def policies(self) -> Sequence[Policy]: ...

    def policy(self, name: str) -> Policy | None: ...

    def release_held(self, token: TaskToken[Any]) -> None: ...

    def submit(self, guarded: GuardedFunction[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> TaskToken[Any]: ...

    # The control API, for policies that steer the pool (convergence).
    @property
    def workers_per_core(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def set_active_workers(self, core_id: int, active: int) -> None: ...

    def active_workers(self, core_id: int) -> int: ...

HOOKS = ("before_submit", "admit", "pick_core", "on_routed", "after_run", "on_settle", "held_behind")


class Policy:
    """Base class of every policy: all hooks are no-ops."""

    #: Short name used in statistics, logs and ``coordinator.policy(name)``.
    name: ClassVar[str] = "policy"

    #: True: ``pick_core``/``on_routed`` are called only for tokens whose
    #: ``policy_data`` some policy set (a cheap opt-out for policies that look
    #: at every call but route only a few).
    route_marked_only: ClassVar[bool] = False

    #: True: besides the functions it is ``interested()`` in, the policy also
    #: sees every call made on a worker thread while a token it marked (set
    #: ``policy_data``) runs there. The conductor uses this to follow call
    #: chains without costing anything on calls made outside them.
    follows_marked_parent: ClassVar[bool] = False

    #: The terminal states ``on_settle`` is called for (None: every state).
    #: Narrowing it keeps the hook off the common COMPLETED path.
    settle_states: ClassVar[frozenset[TokenState] | None] = None

    def on_start(self, coordinator: PolicyHost) -> None:
        """Called once on the loop thread when the coordinator starts."""

    def on_stop(self, coordinator: PolicyHost) -> None:
        """Called once on the loop thread after every token has settled at stop."""

    def interested(self, guarded: GuardedFunction[..., Any]) -> bool:
        """Return False to skip every hook for calls of *guarded* (computed once per function).

        See ``follows_marked_parent`` for calls made inside a marked token.
        """
        return True

    def before_submit(self, token: TaskToken[Any]) -> None:
        """Inspect a call before it is accepted; raise a Rejected subclass to refuse it."""

    def admit(self, token: TaskToken[Any]) -> bool:
        """Return False to hold the token (then release it with ``coordinator.release_held``)."""
        return True

    def pick_core(self, token: TaskToken[Any]) -> int | None:
        """Return a domain (1-based) the token must run on, or None to let the router choose."""
        return None

    def on_routed(self, token: TaskToken[Any], core: int) -> None:
        """Called when the token was placed in a mailbox of *core*."""

    def after_run(self, token: TaskToken[Any]) -> float | None:
        """Called after every attempt that ran; return a delay in seconds to retry it, else None.

        While the coordinator is stopping it is still called, but retries are not scheduled.
        """
        return None

    def on_settle(self, token: TaskToken[Any]) -> None:
        """Called once when the token reached its terminal state.

        Whatever the policy holds for the call (a pin, a domain count, a slot, a
        place in a queue) must be released here for every terminal state:
        COMPLETED and FAILED, but also KILLED (by an operator, a cancelled
        awaiter or a stop, possibly before the call was routed), TIMEOUT (while
        queued, or while its thread still runs), REJECTED by a later policy and
        QUARANTINED. A policy that narrows ``settle_states`` must release in the
        states it leaves out some other way (``after_run``).
        """

    def held_behind(self, token: TaskToken[Any]) -> TaskToken[Any] | None:
        """For a token this policy holds: the call that must make progress before it is released, or None.

        A worker thread that waits on *token* runs that call itself if it has
        not started (and follows its holds in turn), so a chain of held calls
        cannot deadlock a pool whose workers are all waiting. Policies that
        hold calls behind other calls (the sticky policy's ordered keys and
        pins) override it.
        """
        return None

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot of this policy's state for ``coordinator.stats()``."""
        return {}
