"""Quarantine records: what one held call looks like, and its safe-to-display summaries.

:class:`QuarantineRecord` is the immutable row the store returns;
:func:`summarize_args` turns a call's arguments into short, truncated,
never-raising text an operator can read (the pickled payload is the only
dangerous part; see :mod:`tokengate.quarantine.store`).
"""

from __future__ import annotations

import base64
import builtins
import enum
import reprlib
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Any

from tokengate.errors import TokengateError

__all__ = [
    "QuarantineFullError",
    "QuarantineRecord",
    "QuarantineStateError",
    "QuarantineStatus",
    "QuarantineStoreError",
    "summarize_args",
]

_ELLIPSIS = "…"


class QuarantineStoreError(TokengateError, RuntimeError):
    """Raised when the quarantine database fails (wraps :class:`sqlite3.Error`).

    Also raised when the store is used after :meth:`QuarantineStore.close`,
    when the database file cannot be prepared, or when the database was
    written by a newer, incompatible schema version.
    """


class QuarantineFullError(QuarantineStoreError):
    """Raised when a call cannot be stored because ``max_records`` records are already pending.

    Pending records are never evicted (each is a call an operator has not yet
    decided on), so a full store refuses new ones instead; the quarantine
    policy then admits the call (its documented fail-open behaviour).
    """


class QuarantineStateError(TokengateError, ValueError):
    """Raised when a release or discard targets a record that is not PENDING."""


class QuarantineStatus(str, enum.Enum):
    """Lifecycle of a quarantined call: PENDING until released or discarded."""

    PENDING = "pending"
    RELEASED = "released"
    DISCARDED = "discarded"


@dataclass(frozen=True)
class QuarantineRecord:
    """One quarantined call as stored in the database.

    ``payload_kept`` says whether the pickled ``(args, kwargs)`` is stored (so
    the call can be replayed); when it is not, ``payload_error`` says why: the
    arguments could not be pickled, were larger than the store's
    ``max_payload_bytes``, or the payload was evicted by the retention policy.
    ``payload_size`` is the pickle's size in bytes (0 when pickling failed),
    kept even when the payload is not. ``payload`` holds the bytes only on a
    record :meth:`QuarantineStore.prepare` made and not yet stored; records
    read from the database never load it (summaries must stay cheap; see
    :meth:`QuarantineStore.load_payload`). ``outcome_ok`` and
    ``outcome_summary`` are set when the call is released. ``claimed_by``
    (``"host:pid:start/store id"``) and ``claimed_at`` name the store (and
    its process) re-running a PENDING record, or that re-ran a RELEASED one.
    """

    id: str
    operation_type: str
    func_module: str
    func_qualname: str
    trigger: str
    reason: str
    args_summary: str
    kwargs_summary: str
    payload: bytes | None
    payload_error: str | None
    created_at: float
    updated_at: float
    status: QuarantineStatus
    outcome_summary: str | None
    outcome_ok: bool | None
    claimed_by: str | None = None
    claimed_at: float | None = None
    payload_size: int = 0
    payload_kept: bool = False

    @property
    def has_payload(self) -> bool:
        """True when the call's arguments are stored (or, before storing, were pickled) and can be replayed."""
        return self.payload_kept or self.payload is not None

    def to_dict(self, include_payload: bool = False) -> dict[str, Any]:
        """Return a JSON-serialisable dict; never contains raw payload bytes.

        With ``include_payload=True`` the payload is added as base64 text under
        ``payload_b64`` when this object holds it (still a pickle -- see the
        module's trust boundary); records read from the database do not.
        """
        data: dict[str, Any] = {
            "id": self.id,
            "operation_type": self.operation_type,
            "func_module": self.func_module,
            "func_qualname": self.func_qualname,
            "trigger": self.trigger,
            "reason": self.reason,
            "args_summary": self.args_summary,
            "kwargs_summary": self.kwargs_summary,
            "has_payload": self.has_payload,
            "payload_size": self.payload_size,
            "payload_kept": self.has_payload,
            "payload_error": self.payload_error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "status": self.status.value,
            "outcome_summary": self.outcome_summary,
            "outcome_ok": self.outcome_ok,
            "claimed_by": self.claimed_by,
            "claimed_at": self.claimed_at,
        }
        if include_payload:
            data["payload_b64"] = (
                base64.b64encode(self.payload).decode("ascii") if self.payload is not None else None
            )
        return data


# --------------------------------------------------------------------------
# Argument summaries
# --------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + _ELLIPSIS


class _SummaryRepr(reprlib.Repr):
    """reprlib with small limits that marks truncation with an ellipsis."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxtuple = 5
        self.maxlist = 5
        self.maxarray = 5
        self.maxdict = 4
        self.maxset = 5
        self.maxfrozenset = 5
        self.maxdeque = 5
        self.maxstring = 40
        self.maxlong = 40
        self.maxother = 60
        # Used for elided container items on 3.11+; 3.10 hardcodes "...".
        self.fillvalue = _ELLIPSIS

    def _quoted_prefix(self, x: str | bytes) -> str:
        if len(x) <= self.maxstring:
            return builtins.repr(x)
        # Keep the opening of the value (the useful part for an operator) and
        # put the ellipsis inside the quotes: 'abc…'.
        text = builtins.repr(x[: self.maxstring])
        return text[:-1] + _ELLIPSIS + text[-1]

    def repr_str(self, x: str, level: int) -> str:
        return self._quoted_prefix(x)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return self._quoted_prefix(x)

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            # 3.11+ refuses str() of ints past sys.get_int_max_str_digits().
            return f"<int with {x.bit_length()} bits>"

    def repr_instance(self, x: object, level: int) -> str:
        try:
            text = builtins.repr(x)
        except Exception:
            return f"<unrepresentable {type(x).__name__}>"
        return _clip(text, self.maxother)


_REPR = _SummaryRepr()


def _summarize_value(value: object) -> str:
    cls = type(value)
    name = cls.__name__
    try:
        if cls.__repr__ is object.__repr__:
            # Default reprs only add a memory address; the type says it all.
            return name
        text = _REPR.repr(value)
        if text == f"<unrepresentable {name}>":
            return text  # the type name is already in the marker
        if isinstance(value, (str, bytes, bytearray)):
            if len(value) > _REPR.maxstring:
                return f"{name}[len={len(value)}] {text}"
            return f"{name} {text}"
        length: int | None = None
        if isinstance(value, Sized):
            try:
                length = len(value)
            except Exception:  # a broken __len__ only costs the length
                length = None
        if length is not None:
            return f"{name}[len={length}] {text}"
        return f"{name} {text}"
    except Exception:
        return f"<unrepresentable {name}>"


def summarize_args(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], limit: int = 200
) -> tuple[str, str]:
    """Return human-readable ``(args_summary, kwargs_summary)`` for display.

    Positional items look like ``"0: list[len=3] [1, 2, 3]"``, keyword items
    like ``"name: int 5"``; objects with the default ``object.__repr__`` show
    only their type name. Each value's repr is truncated by small reprlib
    limits, and each summary string is capped at ``limit`` characters (the
    last one replaced by "…"). Never raises: a ``__repr__`` that raises
    becomes ``"<unrepresentable TypeName>"``, and a non-positive ``limit`` is
    treated as 1.
    """
    limit = max(1, limit) if isinstance(limit, int) else 200
    try:
        arg_parts = [f"{i}: {_summarize_value(v)}" for i, v in enumerate(args)]
        args_text = _clip(", ".join(arg_parts), limit)
    except Exception:  # e.g. args is not iterable; summaries are best effort
        args_text = f"<unrepresentable {type(args).__name__}>"
    try:
        kw_parts = [f"{k}: {_summarize_value(v)}" for k, v in kwargs.items()]
        kwargs_text = _clip(", ".join(kw_parts), limit)
    except Exception:
        kwargs_text = f"<unrepresentable {type(kwargs).__name__}>"
    return args_text, kwargs_text


# --------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------
