"""The code a process-lane worker runs: a request/reply loop over its pipes (requests in, replies out).

The parent (:class:`tokengate.lanes.process.ChildProcess`) sends one pickled
request at a time and waits for its reply; nothing else travels on the pipe, so
requests carry no ids. Requests:

* ``(CALL, module, qualname, args, kwargs_or_None)``
* ``(MANY, module, qualname, [(args, kwargs_or_None), ...])``
* ``(MANY_ARGS, module, qualname, [args, ...])``: a chunk without keywords

Replies to CALL are one *item*; replies to MANY and MANY_ARGS are ``(values, errors)``: a list
with one value per request item and a dict ``{index: item}`` for the items that
did not return a value (so a batch of successes pickles as a plain list). An
item is one of:

* ``(OK, value)``
* ``(ERROR, exception_bytes, type_name, message, traceback_text)``: the function
  raised; the exception is pickled on its own so that one that does not pickle,
  or does not unpickle in the parent, still arrives as a typed stand-in;
* ``(UNPICKLABLE_RESULT, type_name, detail)``: the function returned something
  that does not pickle;
* ``(UNLOADABLE_REQUEST, type_name, detail)``: the request did not unpickle here
  (an argument whose class the child cannot import); nothing ran.

**Pipelined batches** (the process lane's loop-driven worker): ``(BATCH, slots,
payload)``, *payload* a pickled list of ``(CALL, module, qualname, args,
kwargs_or_None)`` or ``(MANY_ARGS, module, qualname, [args, ...])`` (a ``map``
chunk), one per slot. The parent may send more batches before the replies of
the earlier ones arrive. The child answers **each item on its own**, in order,
as soon as it finishes: the slot number (4 bytes, big-endian, signed) followed by
the pickled *item*, one of the above, or ``(CHUNK, values, errors)`` for a
chunk, or ``(SKIPPED,)`` (the slot travels outside the pickle so that a reply
that does not unpickle in the parent still names its call). Before an item the
child looks at ``states[slot]`` in shared memory, under the shared lock: the
parent set it to ``QUEUED`` before sending; ``SKIP`` (the call was killed or
timed out before it started) means do not run it; otherwise the child sets
``RUNNING``, runs it, and sets ``DONE`` just before replying. So after a death
the parent knows, per slot, what never started (re-sent to the replacement),
what was running (the one call the death fails) and what finished (its reply is
in the pipe, read before deciding). A payload that does not unpickle here gets
one reply with slot -1 and item ``(UNLOADABLE_REQUEST, type_name, detail,
slots)``: nothing of it ran.

The first message the child sends is ``(READY, pid)`` or
``(START_FAILED, traceback_text)``. The child ends when the pipe closes (the
parent went away or closed the handle): between calls it reads EOF and exits
normally; during a call a watchdog thread, which only polls the request pipe
for a hang-up (it never reads it), ends the process :data:`ORPHAN_GRACE`
seconds later, so a parent that dies (SIGKILL, OOM kill) leaves no worker
process computing a result nobody will read.

Each request (one call, or one chunk of a batch) runs in a fresh, empty
:class:`contextvars.Context`: nothing of the parent's context crosses the
process boundary, and nothing one request sets is seen by the next (the items
of one chunk share their context, as calls made in a loop would). SIGINT is ignored: the parent owns the child's lifetime, and a
Ctrl-C in a terminal (sent to the whole process group) must not fail the call
the child is running.
"""

from __future__ import annotations

import contextvars
import importlib
import itertools
import os
import pickle
import select
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, NoReturn, Sequence

# Message kinds (small ints pickle in one byte).
CALL = 1
MANY = 2
MANY_ARGS = 3
READY = 10
START_FAILED = 11
OK = 0
ERROR = 20
UNPICKLABLE_RESULT = 21
UNLOADABLE_REQUEST = 22
BATCH = 4
CHUNK = 23
SKIPPED = 24
# Per-slot states in the shared array (see the module docstring).
QUEUED, RUNNING, DONE, SKIP = 0, 1, 2, 3
#: Slots in a worker process's shared state array: the most calls in flight to one process.
SLOTS = 1024

#: Seconds between the request pipe's hang-up and the watchdog ending a child still running a call
#: (an idle child has exited normally by then, on EOF).
ORPHAN_GRACE = 0.5

PROTOCOL = pickle.HIGHEST_PROTOCOL
_NO_SLOT = (-1).to_bytes(4, "big", signed=True)
_SKIPPED_REPLY = pickle.dumps((SKIPPED,), PROTOCOL)

_Item = tuple[Any, ...]


def child_main(conn: Connection, preload: Sequence[str], shared: tuple[Any, Any] | None,
               replies: Connection) -> None:
    """Entry point of a worker process: preload modules, report ready, serve requests until EOF.

    *conn* is the pipe requests arrive on, *replies* the one replies go to.
    *shared* is ``(states, lock)``: the slot states of pipelined batches and the
    lock that orders the child's start of an item against the parent's skip.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _refuse_nested_calls()
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - report any import failure to the parent, then exit
        replies.send_bytes(pickle.dumps((START_FAILED, traceback.format_exc()), PROTOCOL))
        raise SystemExit(1) from None
    _watch_parent(conn.fileno())
    replies.send_bytes(pickle.dumps((READY, os.getpid()), PROTOCOL))
    _serve(conn, shared, replies)


def _watch_parent(fd: int) -> None:
    """End this process soon after the request pipe *fd* loses its writer (the parent died or closed it).

    The parent is the only writer, so the pipe hangs up when the parent closes
    its end or dies, whichever way (no parent-death signal is needed, and under
    forkserver the process that forked us is not the parent anyway). Between
    calls the main thread reads EOF and the process exits normally, and this
    daemon thread never runs again; a call still running :data:`ORPHAN_GRACE`
    seconds later is cut short with ``os._exit``, which also ends a call blocked
    in C code. Nothing to do where ``select.poll`` is missing (Windows).
    """
    if not hasattr(select, "poll"):
        return

    def watch() -> None:
        poller = select.poll()
        # No events asked for: only a hang-up or an error is reported, so poll() returns only then (it
        # retries an interrupted wait itself); the reading stays with the main thread.
        poller.register(fd, 0)
        poller.poll()
        time.sleep(ORPHAN_GRACE)
        os._exit(0)

    threading.Thread(target=watch, name="tokengate-parent-watch", daemon=True).start()


def _serve(conn: Connection, shared: tuple[Any, Any] | None, out: Connection) -> None:
    recv = conn.recv_bytes
    send = out.send_bytes
    dumps = pickle.dumps
    loads = pickle.loads
    functions: dict[tuple[str, str], Callable[..., Any]] = {}
    while True:
        try:
            data = recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or went away
        try:
            request = loads(data)
        except BaseException as exc:  # noqa: BLE001 - a request that does not load fails that request only
            send(dumps(_unloadable(exc), PROTOCOL))
            continue
        del data
        if request[0] == BATCH and shared is not None:
            _serve_batch(send, request[1], request[2], functions, shared[0], shared[1])
        else:
            send(_answer(request, functions, dumps))
        del request  # free the arguments before blocking for the next request


def _serve_batch(send: Callable[[bytes], None], slots: Sequence[int], payload: bytes,
                 functions: dict[tuple[str, str], Callable[..., Any]], states: Any, lock: Any) -> None:
    """Run a pipelined batch, one reply per item as soon as it is done (see the module docstring)."""
    dumps = pickle.dumps
    try:
        items = pickle.loads(payload)
    except BaseException as exc:  # noqa: BLE001 - nothing of it ran: the parent re-sends the items one by one
        send(_NO_SLOT + dumps((*_unloadable(exc), list(slots)), PROTOCOL))
        return
    del payload
    acquire, release = lock.acquire, lock.release
    for slot, item in zip(slots, items):
        acquire()
        skip = states[slot] == SKIP
        if not skip:
            states[slot] = RUNNING
        release()
        if skip:
            send(slot.to_bytes(4, "big", signed=True) + _SKIPPED_REPLY)
            continue
        kind, module, qualname = item[0], item[1], item[2]
        func = functions.get((module, qualname))
        if func is None:
            try:
                func = functions[(module, qualname)] = _resolve(module, qualname)
            except BaseException as exc:  # noqa: BLE001 - reported as the call's own failure
                reply: Any = _error(exc)
                if kind != CALL:
                    reply = (CHUNK, [None] * len(item[3]), dict.fromkeys(range(len(item[3])), reply))
                states[slot] = DONE
                send(slot.to_bytes(4, "big", signed=True) + dumps(reply, PROTOCOL))
                continue
        if kind == CALL:
            reply = _run(func, item[3], item[4])
            del item
            try:
                data = dumps(reply, PROTOCOL)
            except BaseException as exc:  # noqa: BLE001 - the result does not pickle
                data = dumps(_unpicklable(exc), PROTOCOL)
        else:
            values, errors = contextvars.Context().run(_fast_loop, func, item[3])
            del item
            data = _chunk_reply(values, errors)
        states[slot] = DONE  # one byte: no lock needed (the parent only reads it)
        send(slot.to_bytes(4, "big", signed=True) + data)
        del data


def _fast_loop(func: Callable[..., Any], items: list[Any]) -> tuple[list[Any], dict[int, _Item]]:
    # list.extend over starmap runs the calls in C and keeps the values made
    # before an item raised: about half the cost per item of a Python loop.
    values: list[Any] = []
    errors: dict[int, _Item] = {}
    rest = iter(items)
    while True:
        try:
            values.extend(itertools.starmap(func, rest))
            return values, errors
        except BaseException as exc:  # noqa: BLE001 - one item's failure is that item's outcome
            errors[len(values)] = _error(exc)
            values.append(None)


def _chunk_reply(values: list[Any], errors: dict[int, _Item]) -> bytes:
    return _dump_values(values, errors, CHUNK)


def _dump_values(values: list[Any], errors: dict[int, _Item], *head: Any) -> bytes:
    """Pickle ``(*head, values, errors)``; a value that does not pickle becomes that item's error."""
    try:
        return pickle.dumps((*head, values, errors), PROTOCOL)
    except BaseException:  # noqa: BLE001 - find the values that do not pickle; the rest still travel
        for index, value in enumerate(values):
            if index in errors:
                continue
            try:
                pickle.dumps(value, PROTOCOL)
            except BaseException as exc:  # noqa: BLE001
                values[index] = None
                errors[index] = _unpicklable(exc)
        return pickle.dumps((*head, values, errors), PROTOCOL)


def _answer(request: Any, functions: dict[tuple[str, str], Callable[..., Any]],
            dumps: Callable[..., bytes]) -> bytes:
    kind, module, qualname = request[0], request[1], request[2]
    func = functions.get((module, qualname))
    if func is None:
        try:
            func = _resolve(module, qualname)
        except BaseException as exc:  # noqa: BLE001 - reported as the call's own failure
            item = _error(exc)
            if kind == CALL:
                return dumps(item, PROTOCOL)
            count = len(request[3])
            return dumps(([None] * count, dict.fromkeys(range(count), item)), PROTOCOL)
        functions[(module, qualname)] = func
    if kind != CALL:
        return _run_many(func, request[3], kind == MANY)
    reply = _run(func, request[3], request[4])
    try:
        return dumps(reply, PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - the result does not pickle
        return dumps(_unpicklable(exc), PROTOCOL)


def _run(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> _Item:
    try:
        if kwargs:
            return (OK, contextvars.Context().run(func, *args, **kwargs))
        return (OK, contextvars.Context().run(func, *args))
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are the call's outcome too
        return _error(exc)


def _run_many(func: Callable[..., Any], items: list[Any], with_kwargs: bool) -> bytes:
    values, errors = contextvars.Context().run(_loop_kwargs if with_kwargs else _loop_args, func, items)
    return _dump_values(values, errors)


def _loop_args(func: Callable[..., Any], items: list[Any]) -> tuple[list[Any], dict[int, _Item]]:
    values: list[Any] = []
    errors: dict[int, _Item] = {}
    append = values.append
    for index, args in enumerate(items):
        try:
            append(func(*args))
        except BaseException as exc:  # noqa: BLE001 - one item's failure is that item's outcome
            append(None)
            errors[index] = _error(exc)
    return values, errors


def _loop_kwargs(func: Callable[..., Any], items: list[Any]) -> tuple[list[Any], dict[int, _Item]]:
    values: list[Any] = []
    errors: dict[int, _Item] = {}
    append = values.append
    for index, item in enumerate(items):
        try:
            args, kwargs = item
            append(func(*args, **kwargs) if kwargs else func(*args))
        except BaseException as exc:  # noqa: BLE001 - one item's failure is that item's outcome
            append(None)
            errors[index] = _error(exc)
    return values, errors


def _error(exc: BaseException) -> _Item:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        message = str(exc)
    except BaseException:  # noqa: BLE001 - a user's __str__ may raise
        message = "<str() of the exception failed>"
    try:
        blob: bytes | None = pickle.dumps(exc, PROTOCOL)
    except BaseException:  # noqa: BLE001 - the parent builds a RemoteError from the text instead
        blob = None
    exc.__traceback__ = None  # drop the frames (and the arguments they hold) now
    return (ERROR, blob, name, message, text)


def _unpicklable(exc: BaseException) -> _Item:
    return (UNPICKLABLE_RESULT, type(exc).__name__, _safe_str(exc))


def _unloadable(exc: BaseException) -> _Item:
    return (UNLOADABLE_REQUEST, type(exc).__name__, _safe_str(exc))


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001
        return "<str() failed>"


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    from .references import resolve_reference

    return resolve_reference(module, qualname)


class _RefusingCoordinator:
    """Stands where a decorated call looks for its coordinator, inside a worker process.

    A worker process has none; without this a nested decorated call would raise
    CoordinatorNotRunning advising to start one, which is the wrong advice here.
    """

    def submit(self, guarded: Any, args: Any, kwargs: Any) -> NoReturn:
        from ..errors import NestedCallRefused

        name = getattr(guarded, "qualname", None) or repr(guarded)
        raise NestedCallRefused(
            f"{name}() was called inside a process-lane worker process (pid {os.getpid()}), which has no "
            f"coordinator; call {name}.__wrapped__(...) to run it inline in this process, or make the call "
            "from a function on the thread lane")

    def __getattr__(self, name: str) -> NoReturn:
        from ..errors import NestedCallRefused

        raise NestedCallRefused(
            f"there is no coordinator inside a process-lane worker process (pid {os.getpid()}); "
            f"coordinator.{name} is not available here")

    def __repr__(self) -> str:
        return f"<no coordinator: process-lane worker pid {os.getpid()}>"


def _refuse_nested_calls() -> None:
    # The thread that runs calls is this (main) thread; a decorated call made on
    # it finds the refusing stand-in first. Threads a function starts itself get
    # the plain CoordinatorNotRunning, which is typed too.
    from .. import current

    current._worker_local.coordinator = _RefusingCoordinator()  # type: ignore[assignment]
