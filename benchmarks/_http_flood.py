"""The flood generator of the http benchmark, run as its own process.

``python -m benchmarks._http_flood --url URL --clients N --max-seconds S``
starts N clients that each loop ``GET /heavy`` (one httpx client, one
connection each), prints ``ready`` once they are running, and stops at the
first of: a line on stdin, *max-seconds*, or the per-client request cap. It
then prints one JSON line: the ``time.monotonic()`` of every successful
completion (system-wide on Linux, so comparable with the parent's clock) and
the error count.

A separate process keeps the flood's client-side work (100 connections'
worth of HTTP parsing) off the event loop that times the light probes, as it
would be with real, remote clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import threading
import time

import httpx

__all__ = ["main"]


async def _flood(url: str, clients: int, max_seconds: float, cap: int) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def wait_for_stop_line() -> None:
        sys.stdin.readline()  # a line, or EOF when the parent goes away
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_stop_line, daemon=True).start()
    ctx = ssl.create_default_context()  # shared: httpx builds one per client otherwise
    pool = [httpx.AsyncClient(base_url=url, timeout=120.0, verify=ctx) for _ in range(clients)]
    done: list[float] = []
    errors = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in range(cap):
            try:
                r = await c.get("/heavy")
            except httpx.HTTPError:
                errors += 1
                continue
            if r.status_code == 200:
                done.append(time.monotonic())
            else:
                errors += 1

    tasks = [asyncio.create_task(client(c)) for c in pool]
    print("ready", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), max_seconds)
    except asyncio.TimeoutError:
        pass
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*[c.aclose() for c in pool], return_exceptions=True)
    return {"completions": done, "errors": errors}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks._http_flood")
    p.add_argument("--url", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--max-seconds", type=float, required=True)
    p.add_argument("--cap", type=int, default=10_000, help="requests per client at most")
    ns = p.parse_args(argv)
    out = asyncio.run(_flood(ns.url, ns.clients, ns.max_seconds, ns.cap))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
