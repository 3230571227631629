"""The two FastAPI apps of the http benchmark, and ``python -m benchmarks._http_server`` to serve one.

* ``tokengate``: ``async def`` endpoints awaiting decorated functions (heavy
  weight for the blocking endpoint, light for the probe and the trivial one),
  on a coordinator started in the app's lifespan
  (``tokengate_fastapi.tokengate_lifespan`` when importable, else an
  ``async with OperationsCoordinator(...)`` lifespan of our own).
* ``plain``: the same endpoints as plain ``def``, run by Starlette on anyio's
  default thread pool. ``threads=0`` leaves anyio's limiter at its default (40
  tokens: what a FastAPI user gets); any other value sets the limiter's
  ``total_tokens`` in the lifespan (the benchmark uses TokenGate's total,
  ``num_cores × workers_per_core``).

Routes: ``/heavy`` (blocks ``heavy_ms`` with ``time.sleep``), ``/light`` (a
trivial computation, the probe), ``/trivial`` (returns at once, for req/s),
``/ping`` (``async def``, no thread: a control probe of the event loop alone),
``/health`` (``async def``, no thread: readiness and configuration),
``/stats`` (``async def``: pool statistics, and ``heavy_done``, the number of
``/heavy`` requests answered so far, from which the benchmark computes heavy
throughput without trusting the load generator's clock).

The server binds 127.0.0.1 only. Run as a subprocess by ``bench_http``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import threading
import time
from typing import Any, AsyncIterator

import tokengate
from tokengate import OperationsCoordinator, current_coordinator, task_token_guard

__all__ = ["make_app", "main"]


@task_token_guard(operation_type="bench.http.heavy", tags={"weight": "heavy"})
def heavy_block(seconds: float) -> dict[str, bool]:
    time.sleep(seconds)
    return {"ok": True}


@task_token_guard(operation_type="bench.http.light", tags={"weight": "light"})
def light_probe() -> dict[str, int]:
    return {"sum": sum(range(100))}


@task_token_guard(operation_type="bench.http.trivial", tags={"weight": "light"})
def trivial() -> dict[str, bool]:
    return {"ok": True}


def _tokengate_lifespan(num_cores: int, workers_per_core: int, mode: str) -> tuple[Any, str]:
    kwargs: dict[str, Any] = {"num_cores": num_cores, "workers_per_core": workers_per_core}
    # Diagnostics only (benchmarks._http_diag): run without the default policies.
    if os.environ.get("BENCH_HTTP_POLICIES") == "none":
        kwargs["policies"] = []
    if mode in ("auto", "tokengate_fastapi"):
        try:
            from tokengate_fastapi import tokengate_lifespan
        except ImportError:
            if mode == "tokengate_fastapi":
                raise
        else:
            return tokengate_lifespan(drain_timeout=5.0, **kwargs), "tokengate_fastapi.tokengate_lifespan"

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with OperationsCoordinator(**kwargs, stop_timeout=5.0):
            yield

    return lifespan, "own lifespan: async with OperationsCoordinator(...)"


def make_app(kind: str, *, num_cores: int, workers_per_core: int, heavy_ms: int, lifespan_mode: str = "auto",
             threads: int | None = None) -> Any:
    """Build the ``tokengate`` or ``plain`` app (FastAPI is imported here, not at module import).

    *threads* is the plain app's limiter: ``None`` = ``num_cores × workers_per_core``
    (the same total as TokenGate), ``0`` = anyio's default (left untouched).
    """
    from fastapi import FastAPI

    heavy_s = heavy_ms / 1000
    # Diagnostics only (benchmarks._http_diag): each /heavy call sleeps heavy_s x uniform(1 - j, 1 + j),
    # as real blocking calls vary, instead of exactly heavy_s.
    jitter = float(os.environ.get("BENCH_HTTP_HEAVY_JITTER") or 0.0)
    if jitter:
        heavy_s_fixed = heavy_s

        def heavy_time() -> float:
            return heavy_s_fixed * random.uniform(1 - jitter, 1 + jitter)
    else:
        def heavy_time() -> float:
            return heavy_s
    total = num_cores * workers_per_core
    if threads is None:
        threads = total
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = anyio's default), got {threads}")
    info: dict[str, Any] = {"kind": kind, "pid": os.getpid(), "num_cores": num_cores,
                            "workers_per_core": workers_per_core, "total_threads": total, "heavy_ms": heavy_ms,
                            "tokengate_file": tokengate.__file__}
    # /heavy answers, counted by the endpoint (the plain app's runs on pool threads: a lock, whose
    # cost is nothing next to the 200 ms sleep).
    done = [0]
    done_lock = threading.Lock()
    # When the last /heavy answers completed (perf_counter): how bunched they are shows whether the
    # flood's completions arrive in waves (GET /heavy_times; diagnostics).
    done_times: collections.deque[float] = collections.deque(maxlen=4096)

    if kind == "tokengate":
        lifespan, how = _tokengate_lifespan(num_cores, workers_per_core, lifespan_mode)
        info["lifespan"] = how
        app = FastAPI(lifespan=lifespan)

        if os.environ.get("BENCH_HTTP_HEAVY") == "anyio":
            # Diagnostics only: the flood bypasses TokenGate (a def endpoint on anyio's pool), so
            # what remains of a tail is the coordinator's mere presence, not its dispatching.
            @app.get("/heavy", response_model=None)
            def heavy_tg_anyio() -> dict[str, bool]:
                time.sleep(heavy_time())
                with done_lock:
                    done[0] += 1
                    done_times.append(time.perf_counter())
                return {"ok": True}
        else:
            @app.get("/heavy", response_model=None)
            async def heavy_tg() -> dict[str, bool]:
                out = await heavy_block(heavy_time())
                done[0] += 1  # on the loop thread
                done_times.append(time.perf_counter())
                return out

        @app.get("/light", response_model=None)
        async def light_tg() -> dict[str, int]:
            return await light_probe()

        @app.get("/trivial", response_model=None)
        async def trivial_tg() -> dict[str, bool]:
            return await trivial()

        @app.get("/stats")
        async def stats_tg() -> dict[str, Any]:
            c = current_coordinator()
            if c is None:
                return {"error": "no coordinator"}
            s = c.stats()
            return {"counts": s["counts"], "routed_by_weight": s["routed_by_weight"],
                    "max_workers": s["routing"]["max_workers"], "queue_wait": s["queue_wait"],
                    "heavy_done": done[0]}

    elif kind == "plain":

        @contextlib.asynccontextmanager
        async def plain_lifespan(app: Any) -> AsyncIterator[None]:
            import anyio.to_thread

            # The default limiter is per event loop: set it once the server's loop runs.
            if threads:
                anyio.to_thread.current_default_thread_limiter().total_tokens = threads
            yield

        info["lifespan"] = ("anyio default limiter total_tokens set in lifespan" if threads
                            else "anyio default limiter untouched")
        app = FastAPI(lifespan=plain_lifespan)

        @app.get("/heavy", response_model=None)
        def heavy_plain() -> dict[str, bool]:
            time.sleep(heavy_time())
            with done_lock:
                done[0] += 1
                done_times.append(time.perf_counter())
            return {"ok": True}

        @app.get("/light", response_model=None)
        def light_plain() -> dict[str, int]:
            return {"sum": sum(range(100))}

        @app.get("/trivial", response_model=None)
        def trivial_plain() -> dict[str, bool]:
            return {"ok": True}

        @app.get("/stats")
        async def stats_plain() -> dict[str, Any]:
            import anyio.to_thread

            lim = anyio.to_thread.current_default_thread_limiter()
            st = lim.statistics()
            return {"total_tokens": lim.total_tokens, "borrowed_tokens": st.borrowed_tokens,
                    "tasks_waiting": st.tasks_waiting, "heavy_done": done[0]}
    else:
        raise ValueError(f"unknown app kind {kind!r}; use 'tokengate' or 'plain'")

    @app.get("/heavy_times", response_model=None)
    async def heavy_times() -> dict[str, Any]:
        return {"times": list(done_times)}

    @app.get("/ping", response_model=None)
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        out = dict(info)
        if kind == "tokengate":
            c = current_coordinator()
            out["routing_max_workers"] = None if c is None else c.routing.to_dict()["max_workers"]
            out["policies"] = None if c is None else [p.name for p in c.policies]
        else:
            import anyio.to_thread

            out["limiter_total_tokens"] = anyio.to_thread.current_default_thread_limiter().total_tokens
            out["total_threads"] = out["limiter_total_tokens"]
        return out

    return app


def main(argv: list[str] | None = None) -> None:
    """Serve one app with uvicorn on 127.0.0.1 until SIGTERM/SIGINT."""
    import faulthandler
    import signal

    import uvicorn

    # `kill -USR1 <pid>` dumps every thread's stack into the server log: for diagnosing a stuck run.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # Diagnostics only (benchmarks._http_diag): the interpreter's GIL switch interval for this
    # server, to see how much of a tail is GIL hand-off. A library must never set it.
    switch = os.environ.get("BENCH_HTTP_SWITCH_INTERVAL")
    if switch:
        import sys

        sys.setswitchinterval(float(switch))
    p = argparse.ArgumentParser(prog="python -m benchmarks._http_server")
    p.add_argument("--kind", choices=["tokengate", "plain"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--num-cores", type=int, required=True)
    p.add_argument("--workers-per-core", type=int, required=True)
    p.add_argument("--heavy-ms", type=int, default=200)
    p.add_argument("--lifespan", choices=["auto", "own", "tokengate_fastapi"], default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="plain app: limiter tokens (0 = anyio's default; default: num_cores x workers_per_core)")
    ns = p.parse_args(argv)
    app = make_app(ns.kind, num_cores=ns.num_cores, workers_per_core=ns.workers_per_core, heavy_ms=ns.heavy_ms,
                   lifespan_mode=ns.lifespan, threads=ns.threads)
    # Same server settings for both apps: asyncio loop, h11, no access log.
    uvicorn.run(app, host="127.0.0.1", port=ns.port, log_level="warning", access_log=False, loop="asyncio",
                http="h11", lifespan="on", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
