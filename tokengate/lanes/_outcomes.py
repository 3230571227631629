"""What a call in a worker process produces, and how a reply from the child becomes it.

:class:`Outcome` (one call), :class:`Batch` (many, without an object per item)
and :class:`RemoteTraceback` (the ``__cause__`` of an exception raised in the
child) are public (re-exported by :mod:`tokengate.lanes`). :func:`decode` turns
one reply item of :mod:`tokengate.lanes._child`'s protocol into an
:class:`Outcome`; :func:`failure` and :func:`pickling_failed` build the outcome
of a call whose arguments or result did not cross. Used by
:class:`~tokengate.lanes.process.ChildProcess`, :mod:`tokengate.lanes._chunks`,
:class:`~tokengate.lanes.pool.ProcessPoolLane` and
:mod:`tokengate.lanes.process_worker`.
"""

from __future__ import annotations

import pickle
from typing import Any, Generic, TypeVar

from ..errors import PicklingFailed, RemoteError
from ._child import ERROR, OK, UNLOADABLE_REQUEST, UNPICKLABLE_RESULT
from .references import FunctionRef

__all__ = ["Batch", "Outcome", "RemoteTraceback", "decode", "failure", "pickling_failed"]

R = TypeVar("R")


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception raised in a worker process: the child's formatted traceback."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class Outcome(Generic[R]):
    """What one call produced: a value (``ok``) or an exception (``error``).

    ``unwrap()`` returns the value or raises the exception.
    """

    __slots__ = ("ok", "value", "error")

    def __init__(self, ok: bool, value: R | None, error: BaseException | None) -> None:
        self.ok = ok
        self.value = value
        self.error = error

    def unwrap(self) -> R:
        """Return the value, or raise the call's exception."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"Outcome(value={self.value!r})" if self.ok else f"Outcome(error={self.error!r})"


class Batch:
    """The outcomes of a batch: ``values[i]`` for every item, ``errors[i]`` for the items that failed.

    ``values[i]`` is None where ``errors`` has *i*. Built without an object per
    item, so a batch of many small results stays cheap.
    """

    __slots__ = ("values", "errors")

    def __init__(self, values: list[Any], errors: dict[int, BaseException]) -> None:
        self.values = values
        self.errors = errors

    def __len__(self) -> int:
        return len(self.values)

    def outcomes(self) -> list[Outcome[Any]]:
        """One :class:`Outcome` per item, in order."""
        errors = self.errors
        if not errors:
            return [Outcome(True, value, None) for value in self.values]
        return [Outcome(False, None, errors[i]) if i in errors else Outcome(True, value, None)
                for i, value in enumerate(self.values)]

    def results(self) -> list[Any]:
        """The values in order, or raise the error of the first item that failed (as ``Executor.map``)."""
        if self.errors:
            raise self.errors[min(self.errors)]
        return self.values

    def extend(self, other: Batch) -> None:
        """Append *other*'s items after this batch's."""
        offset = len(self.values)
        self.values.extend(other.values)
        for index, error in other.errors.items():
            self.errors[offset + index] = error


def failure(error: BaseException) -> Outcome[Any]:
    return Outcome(False, None, error)


def pickling_failed(ref: FunctionRef, direction: str, exc: BaseException) -> PicklingFailed:
    what = "arguments" if direction == "arguments" else "result"
    detail = _safe_str(exc)
    error = PicklingFailed(
        f"the {what} of {ref.key} could not be {'sent to' if direction == 'arguments' else 'brought back from'} "
        f"the worker process: {type(exc).__name__}: {detail}", direction=direction, type_name=type(exc).__name__,
        detail=detail)
    error.__cause__ = exc
    return error


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except BaseException:  # noqa: BLE001 - a user's __str__ may raise
        return "<str() failed>"


def decode(ref: FunctionRef, item: tuple[Any, ...]) -> Outcome[Any]:
    kind = item[0]
    if kind == OK:
        return Outcome(True, item[1], None)
    if kind == ERROR:
        _, blob, type_name, message, text = item
        error: BaseException | None = None
        if blob is not None:
            try:
                error = pickle.loads(blob)
            except Exception:  # noqa: BLE001 - an exception that does not unpickle here
                error = None
        if not isinstance(error, BaseException):
            error = RemoteError(f"{ref.key} raised {type_name}: {message} (the exception could not be sent back "
                                "as it is)", type_name=type_name, remote_message=message, traceback=text)
        error.__cause__ = RemoteTraceback(text)
        return failure(error)
    if kind == UNPICKLABLE_RESULT:
        return failure(PicklingFailed(
            f"the result of {ref.key} could not be brought back from the worker process: {item[1]}: {item[2]}",
            direction="result", type_name=item[1], detail=item[2]))
    if kind == UNLOADABLE_REQUEST:
        return failure(PicklingFailed(
            f"the arguments of {ref.key} could not be unpickled in the worker process (nothing ran): "
            f"{item[1]}: {item[2]}", direction="arguments", type_name=item[1], detail=item[2]))
    raise AssertionError(f"unknown reply kind {kind!r}")
