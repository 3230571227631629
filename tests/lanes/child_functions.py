"""Functions the lane tests run in worker processes: module level, so a child can import them by name."""

from __future__ import annotations

import contextvars
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tokengate import task_token_guard

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")
_hoard: list[bytes] = []


def add(x: int, y: int = 0) -> int:
    return x + y


def inc(x: int) -> int:
    return x + 1


def pid() -> int:
    return os.getpid()


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def fail(message: str) -> None:
    raise ValueError(message)


def fail_chained() -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        raise RuntimeError("outer") from exc


class NeedsTwoArgs(Exception):
    """Pickles (args=(a,)) but does not unpickle: __init__ requires b as well."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(a)
        self.b = b


def fail_unloadable_exception() -> None:
    raise NeedsTwoArgs("first", "second")


class HoldsALock(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def fail_unpicklable_exception() -> None:
    raise HoldsALock("cannot pickle me")


def return_lock() -> Any:
    return threading.Lock()


def _explode() -> None:
    raise RuntimeError("this object refuses to be unpickled")


class BadOnLoad:
    """Pickles fine; unpickling it raises."""

    def __reduce__(self) -> Any:
        return (_explode, ())


def return_bad_on_load() -> BadOnLoad:
    return BadOnLoad()


def take(value: Any) -> str:
    return type(value).__name__


def value_or_lock(x: int) -> Any:
    return threading.Lock() if x == 3 else x


def fail_if(x: int) -> int:
    if x % 3 == 0:
        raise ValueError(f"bad {x}")
    return x


def call_sys_exit() -> None:
    sys.exit(3)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def segfault() -> None:
    ctypes.string_at(0)


def hard_exit(code: int) -> None:
    os._exit(code)


def kill_self(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(30)


def crash_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(7)
    return x


def mark_and_block(path: str, seconds: float = 60.0) -> str:
    """Create *path* (the test's 'the call has started'), then block."""
    staging = Path(f"{path}.{os.getpid()}.tmp")
    staging.write_text(str(os.getpid()))
    staging.rename(path)  # atomic: the test never sees the file without the pid
    time.sleep(seconds)
    return "finished"


def ignore_sigterm_mark_and_block(path: str, seconds: float = 60.0) -> str:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return mark_and_block(path, seconds)


def hoard(megabytes: int) -> int:
    _hoard.append(b"x" * (megabytes * 1024 * 1024))
    return len(_hoard)


def read_var() -> str:
    return VAR.get()


def set_var(value: str) -> str:
    VAR.set(value)
    return VAR.get()


@task_token_guard(operation_type="lanes.guarded_double", tags={"weight": "light"})
def guarded_double(x: int) -> int:
    return 2 * x


def call_guarded_nested(x: int) -> int:
    token = guarded_double(x)  # raises in a worker process: no coordinator there
    return token.get(timeout=5)  # pragma: no cover - never reached in a child


def call_guarded_inline(x: int) -> int:
    return guarded_double.__wrapped__(x)


def nested_refusal_details() -> tuple[str, bool, str]:
    from tokengate import CoordinatorNotRunning

    try:
        guarded_double(1)
    except CoordinatorNotRunning as exc:
        return type(exc).__name__, isinstance(exc, CoordinatorNotRunning), str(exc)
    return "no error", False, ""  # pragma: no cover


def spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i * i
    return total
