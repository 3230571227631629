"""Schemathesis hooks for ``test_contract_fuzz.py`` (loaded by ``st run`` through its config file).

The fuzzer draws valid sleeps anywhere in their documented range (``/slow``
up to 30 s, ``/heavy`` up to 2 s...), which would make a bounded run take
many minutes without testing anything more. This hook shortens valid values
above a cap to the cap; a value outside the documented range (the fuzzer's
negative cases) is left alone, so each input still tests what it was drawn for.
"""

from __future__ import annotations

from typing import Any

import schemathesis

#: (path, query parameter) -> the largest value sent; only values in (cap, documented max] are lowered.
CAPS: dict[tuple[str, str], tuple[float, float]] = {
    ("/slow", "seconds"): (0.2, 30),
    ("/jobs/slow", "seconds"): (0.2, 30),
    ("/heavy", "ms"): (200, 2000),
    ("/io", "ms"): (100, 2000),
    ("/light", "n"): (200_000, 2_000_000),
    ("/medium", "rounds"): (50_000, 2_000_000),
}


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Lower long but valid sleeps and loop counts to their caps, in every phase (see the module docstring)."""
    query = getattr(case, "query", None)
    if not isinstance(query, dict):
        return
    for (path, name), (cap, documented_max) in CAPS.items():
        if case.operation.path != path or name not in query:
            continue
        value = query[name]
        if isinstance(value, str):  # the coverage phase sends query values as text
            try:
                number = float(value)
            except ValueError:
                continue
            if cap < number <= documented_max:
                query[name] = str(int(cap) if float(cap).is_integer() and "." not in value else cap)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and cap < value <= documented_max:
            query[name] = type(value)(cap)
