"""``python -m example_app``: serve the example app with uvicorn on 127.0.0.1:8000 and print the admin token.

The admin token comes from ``$TOKENGATE_ADMIN_TOKEN``, or is generated for
this run (``secrets.token_urlsafe``) and printed, so the curl walkthrough in
``example_app/README.md`` can use it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import sys
from typing import Mapping, Sequence

from tokengate_fastapi import ADMIN_TOKEN_ENV_VAR

from .app import ADMIN_PREFIX, DEFAULT_QUARANTINE_PATH, create_app


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


def banner(base: str, token: str, generated: bool, quarantine_path: str) -> str:
    """The start-up text: where the app is, and the admin token to export."""
    origin = "generated for this run" if generated else f"from ${ADMIN_TOKEN_ENV_VAR}"
    return "\n".join([
        "",
        "TokenGate example app",
        f"  app:           {base}/",
        f"  dashboard:     {base}{ADMIN_PREFIX}/dashboard  (paste the admin token there)",
        f"  quarantine db: {quarantine_path}",
        f"  admin token:   {token}   ({origin})",
        "",
        "In another terminal:",
        f"  export {ADMIN_TOKEN_ENV_VAR}={token}",
        f"  export BASE={base}",
        f'  curl -s -H "Authorization: Bearer ${ADMIN_TOKEN_ENV_VAR}" "$BASE{ADMIN_PREFIX}/stats"',
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, print the banner, serve until Ctrl-C (which drains, then stops)."""
    parser = argparse.ArgumentParser(prog="python -m example_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; anything else exposes the admin API)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--quarantine-db", default=DEFAULT_QUARANTINE_PATH,
                        help=f"quarantine SQLite file (default ./{DEFAULT_QUARANTINE_PATH})")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)

    # tokengate logs blocks, quarantines, drains and pauses: show them next to uvicorn's lines.
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)-9s %(name)s: %(message)s")
    token, generated = admin_token(os.environ)
    db = args.quarantine_db
    quarantine_path = db if db == ":memory:" else os.path.abspath(db)
    app = create_app(admin_token=token, quarantine_path=quarantine_path)

    import uvicorn  # imported late: --help works without it

    host_in_url = f"[{args.host}]" if ":" in args.host else args.host
    print(banner(f"http://{host_in_url}:{args.port}", token, generated, quarantine_path), flush=True)
    if not _is_loopback(args.host):
        print(f"WARNING: listening on {args.host}: the admin API is reachable from other machines; "
              "anyone with the token can drain, pause and kill work.", file=sys.stderr, flush=True)
    # timeout_graceful_shutdown: an open /events stream (the dashboard) must not hold Ctrl-C for a minute.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
