"""What a Dask worker runs for a Dask-lane call: the task's function and how a small result comes back.

The lane (:mod:`tokengate.lanes.dask_calls`) submits :func:`invoke` with one
:class:`Payload` per call; this module is all that is imported on the Dask
worker for it (besides the call's own function), so it stays small and imports
``distributed`` only inside the task.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Mapping

__all__ = ["PUSH_LIMIT", "Payload", "invoke", "push_result", "queue_event"]

#: Results whose pickle is at most this many bytes come back with the task's end (see
#: :func:`push_result`); larger ones are fetched with ``client.gather``.
PUSH_LIMIT = 4096


class Payload:
    """One call as it travels to a Dask worker: opaque to Dask's graph parser (no tuple is read as a task).

    ``topic`` and ``key``: where the worker publishes a small result (see
    :func:`push_result`); None when the lane takes every result with a gather.
    """

    __slots__ = ("func", "args", "kwargs", "topic", "key")

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any] | None,
                 key: str | None = None) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.topic: str | None = None  # set at submission: the topic of the client submitting it
        self.key = key

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.func, self.args, self.kwargs, self.topic, self.key)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.func, self.args, self.kwargs, self.topic, self.key = state


def invoke(payload: Payload) -> Any:
    """Run one call on a Dask worker (the task's function)."""
    if payload.kwargs:
        value = payload.func(*payload.args, **payload.kwargs)
    else:
        value = payload.func(*payload.args)
    if payload.topic is not None:
        push_result(payload.topic, payload.key, value)
    return value


def push_result(topic: str, key: str | None, value: Any) -> None:
    """Publish a small result as a Dask event, so it reaches the lane with the task's end. Thread: a Dask task.

    Why: a result fetched with ``client.gather`` is a request to the
    scheduler, which asks the worker (busy with its next task on a saturated
    cluster: its thread must hand the GIL to the worker's event loop to serve
    it) and answers: 4-6 messages through the app's process per fetch. An
    event rides on the streams Dask already keeps open: the worker's batched
    stream to the scheduler, just ahead of this task's ``task-finished``, and
    the scheduler's stream to the client, just ahead of ``key-in-memory``. The
    value also stays the task's result on the worker, as always. A result
    that does not pickle, or whose pickle is over ``PUSH_LIMIT`` bytes, is
    not published: the lane fetches it with a gather, as it does when no
    event comes.
    """
    try:
        blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - e.g. a value only cloudpickle handles: the gather fetches it
        return
    if len(blob) > PUSH_LIMIT:
        return
    try:
        from distributed import get_worker

        worker = get_worker()
        worker.loop.add_callback(queue_event, worker, {"op": "log-event", "topic": topic, "msg": [key, blob]})
    except Exception:  # noqa: BLE001 - not on a Dask worker (or it is closing): the gather fetches it
        return


def queue_event(worker: Any, msg: dict[str, Any]) -> None:
    """Put a result event in the worker's stream to the scheduler, to leave with this task's end. Thread: its loop.

    ``Worker.log_event`` would wake the stream, which sends at once when it is
    idle: the event would leave alone and this task's ``task-finished`` a
    window later, two batches through the scheduler and two to the client
    per call. Appended to the stream's buffer, it leaves with the
    ``task-finished`` that follows (which wakes the stream). A stream of
    another shape (another ``distributed`` version) gets ``log_event``.
    """
    stream = getattr(worker, "batched_stream", None)
    buffer = getattr(stream, "buffer", None)
    comm = getattr(stream, "comm", None)
    if isinstance(buffer, list) and comm is not None and not comm.closed():
        buffer.append(msg)
    else:
        worker.log_event(msg["topic"], msg["msg"])
