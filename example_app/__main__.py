"""``python -m example_app``: serve the example app with uvicorn on 127.0.0.1:8000 and print the admin token.

The admin token comes from ``$TOKENGATE_ADMIN_TOKEN``, or is generated for
this run (``secrets.token_urlsafe``) and printed, so the curl walkthrough in
``example_app/README.md`` can use it.

``--workers N`` (N > 1) serves it with N uvicorn worker processes, each with
its own coordinator, joined into one fleet through ``--fleet-dir`` (default
``./example-fleet``): the admin API then answers for, and controls, every
process whichever one a request reaches. Those processes get the token, the
quarantine file and the fleet directory through the environment
(``TOKENGATE_ADMIN_TOKEN``, ``TOKENGATE_EXAMPLE_QUARANTINE_DB``,
``TOKENGATE_FLEET_DIR``); on SIGTERM each drains in its own lifespan
(uvicorn's order: it stops listening first; the drain-first order of
``serve.py`` is for the single-process server).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import secrets
import sys
from typing import Mapping, Sequence

from tokengate_fastapi import ADMIN_TOKEN_ENV_VAR

from tokengate.fleet import FLEET_DIR_ENV_VAR

from .app import ADMIN_PREFIX, DEFAULT_FLEET_DIR, DEFAULT_QUARANTINE_PATH, DRAIN_TIMEOUT, QUARANTINE_ENV_VAR, create_app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(environ: Mapping[str, str]) -> tuple[str, bool]:
    """The admin token from *environ*, or a freshly generated one; and whether it was generated."""
    token = environ.get(ADMIN_TOKEN_ENV_VAR, "").strip()
    if token:
        return token, False
    return secrets.token_urlsafe(32), True


def banner(base: str, token: str, generated: bool, quarantine_path: str, *, workers: int = 1,
           fleet_dir: str | None = None) -> str:
    """The start-up text: where the app is, and the admin token to export."""
    origin = "generated for this run" if generated else f"from ${ADMIN_TOKEN_ENV_VAR}"
    lines = [
        "",
        "TokenGate example app",
        f"  app:           {base}/",
        f"  dashboard:     {base}{ADMIN_PREFIX}/dashboard  (paste the admin token there)",
        f"  quarantine db: {quarantine_path}",
    ]
    if fleet_dir is not None:
        lines.append(f"  fleet:         {workers} worker process(es) sharing {fleet_dir}")
    lines += [
        f"  admin token:   {token}   ({origin})",
        "",
        "In another terminal:",
        f"  export {ADMIN_TOKEN_ENV_VAR}={token}",
        f"  export BASE={base}",
        f'  curl -s -H "Authorization: Bearer ${ADMIN_TOKEN_ENV_VAR}" "$BASE{ADMIN_PREFIX}/stats"',
    ]
    if fleet_dir is not None:
        lines.append(f'  curl -s -H "Authorization: Bearer ${ADMIN_TOKEN_ENV_VAR}" "$BASE{ADMIN_PREFIX}/fleet"')
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, print the banner, serve until SIGTERM or Ctrl-C (which drain, then stop)."""
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; anything else exposes the admin API)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--quarantine-db", default=DEFAULT_QUARANTINE_PATH,
                        help=f"quarantine SQLite file (default ./{DEFAULT_QUARANTINE_PATH})")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT,
                        help=f"seconds a shutdown (SIGTERM, Ctrl-C) waits for accepted calls before stopping "
                             f"them (default {DRAIN_TIMEOUT:g})")
    parser.add_argument("--timeout-graceful-shutdown", type=int, default=None,
                        help="uvicorn's wait, in whole seconds, for responses still being written after the "
                             "drain; not shorter than the drain (default: the drain timeout, rounded up)")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes (default 1); above 1 they form one fleet (--fleet-dir)")
    parser.add_argument("--fleet-dir", default=None,
                        help=f"fleet directory shared by the worker processes (default ./{DEFAULT_FLEET_DIR} with "
                             f"--workers above 1, else ${FLEET_DIR_ENV_VAR} or no fleet)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if not math.isfinite(args.drain_timeout) or args.drain_timeout < 0:
        parser.error(f"--drain-timeout must be a number of seconds >= 0, got {args.drain_timeout}")
    graceful = math.ceil(args.drain_timeout) if args.timeout_graceful_shutdown is None \
        else args.timeout_graceful_shutdown
    if graceful < args.drain_timeout:
        # Item 12 of issue 12: a graceful timeout shorter than the drain cancelled in-flight requests.
        parser.error(f"--timeout-graceful-shutdown ({graceful}) must not be shorter than --drain-timeout "
                     f"({args.drain_timeout:g})")

    # tokengate logs blocks, quarantines, drains and pauses: show them next to uvicorn's lines.
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)-9s %(name)s: %(message)s")
    token, generated = admin_token(os.environ)
    db = args.quarantine_db
    quarantine_path = db if db == ":memory:" else os.path.abspath(db)
    fleet_dir = args.fleet_dir or (DEFAULT_FLEET_DIR if args.workers > 1 else os.environ.get(FLEET_DIR_ENV_VAR))
    fleet_dir = os.path.abspath(fleet_dir) if fleet_dir else None
    if args.workers > 1 and db == ":memory:":
        parser.error("--quarantine-db :memory: cannot be shared by several worker processes; give a file")
    host_in_url = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host_in_url}:{args.port}"
    if not _is_loopback(args.host):
        print(f"WARNING: listening on {args.host}: the admin API is reachable from other machines; "
              "anyone with the token can drain, pause and kill work.", file=sys.stderr, flush=True)
    if args.workers > 1:
        import uvicorn  # late, so --help works without it

        # Each worker process builds the app itself (example_app.app:app), from this environment.
        os.environ.update({ADMIN_TOKEN_ENV_VAR: token, QUARANTINE_ENV_VAR: quarantine_path,
                           FLEET_DIR_ENV_VAR: str(fleet_dir)})
        print(banner(base, token, generated, quarantine_path, workers=args.workers, fleet_dir=fleet_dir), flush=True)
        uvicorn.run("example_app.app:app", host=args.host, port=args.port, workers=args.workers,
                    log_level=args.log_level, timeout_graceful_shutdown=graceful)
        return 0
    app = create_app(admin_token=token, quarantine_path=quarantine_path, drain_timeout=args.drain_timeout,
                     fleet_dir=fleet_dir)

    from .serve import serve  # imports uvicorn: late, so --help works without it

    print(banner(base, token, generated, quarantine_path, fleet_dir=fleet_dir), flush=True)
    # SIGTERM / Ctrl-C: drain, stop the coordinator, then let uvicorn close (example_app/serve.py).
    serve(app, host=args.host, port=args.port, log_level=args.log_level, drain_timeout=args.drain_timeout,
          timeout_graceful_shutdown=graceful)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
