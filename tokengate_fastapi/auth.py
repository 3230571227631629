"""Bearer-token authentication for the admin router. It fails closed.

Where the token comes from, in order: ``admin_router(token=...)``, then the
``TOKENGATE_ADMIN_TOKEN`` environment variable, read when ``admin_router()``
is called (never at import). Then:

* a token is configured: protected routes need ``Authorization: Bearer
  <token>``; a missing or wrong one answers 401 with ``WWW-Authenticate:
  Bearer``. The comparison is constant-time (``secrets.compare_digest`` over
  SHA-256 digests, so not even the token's length leaks);
* no token, and no opt-in: every protected route answers 503 saying how to
  configure one. Nothing is ever open by accident;
* no token and ``allow_unauthenticated=True``: an explicit development mode,
  logged as a warning when the router is built. A configured token always
  wins over this flag.

No cookies are read or set, so there is no CSRF surface: a browser only sends
the token when page script adds the header.

``/events`` also accepts ``?access_token=<token>``, because the browser's
``EventSource`` cannot send headers. The tradeoff: a URL can end up in
access logs and proxy logs, so prefer the header (``fetch()`` with a
streaming body can send it), and treat logs of the admin prefix as secret.
Building a token-protected router adds a filter to the ``uvicorn.access``
logger that redacts the value of every query parameter whose name *decodes*
to ``access_token`` (``access%5Ftoken=``, ``%61ccess_token=`` and the like
authenticate too, since Starlette decodes names before matching them);
other loggers and proxies in front are yours.
"""

import hashlib
import logging
import os
import re
import secrets
from typing import Any, Literal
from urllib.parse import unquote_plus

from fastapi import Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from tokengate.errors import ConfigurationError

from .errors import AdminError, ErrorCode

__all__ = ["AdminAuth", "ENV_VAR", "RedactAccessToken", "redact_access_token", "resolve_admin_token"]

logger = logging.getLogger(__name__)

ENV_VAR = "TOKENGATE_ADMIN_TOKEN"
_SHORT_TOKEN = 16

AuthMode = Literal["token", "unauthenticated", "unconfigured"]

NOT_CONFIGURED_MESSAGE = (
    "the tokengate admin API has no token configured, so it refuses every request; "
    f"set the {ENV_VAR} environment variable or pass admin_router(token=...) "
    "(admin_router(allow_unauthenticated=True) opens it for local development only)"
)


def resolve_admin_token(token: str | None) -> str | None:
    """The admin token to use: *token* if given, else ``$TOKENGATE_ADMIN_TOKEN``, else None.

    Raises:
        ConfigurationError: when *token* is given but empty, not a string, or
            contains whitespace (a copy-paste accident that would never match).
    """
    if token is None:
        from_env = os.environ.get(ENV_VAR, "").strip()
        return from_env or None
    if not isinstance(token, str) or not token or any(ch.isspace() for ch in token):
        # Never echo the value: it is (nearly) a secret and would land in logs and tracebacks.
        what = f"a {type(token).__name__}" if not isinstance(token, str) else f"{len(token)} characters"
        raise ConfigurationError(
            f"admin token must be a non-empty string without whitespace, got {what}; "
            f"generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


QUERY_TOKEN = "access_token"
REDACTED = "[redacted]"
# A query string in a log line: from "?" up to whitespace, a quote or a fragment.
_QUERY_IN_TEXT = re.compile(r"\?([^\s\"'#]*)")
_SEPARATORS = re.compile(r"([&;])")
_MAX_DECODE_ROUNDS = 4


def _names_the_token(raw_name: str) -> bool:
    # Decode as Starlette does (percent escapes, "+" as space), again for double encoding, so no
    # spelling of the name that reaches the auth check (or nearly does) survives in a log.
    name = raw_name
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = unquote_plus(name, errors="replace")
        if decoded == name:
            break
        name = decoded
    return name.strip().casefold() == QUERY_TOKEN


def _redact_query(match: "re.Match[str]") -> str:
    # Starlette splits on "&" only; ";" counts too here, so "?a=1;access_token=..." is not logged either.
    parts = _SEPARATORS.split(match.group(1))
    for i in range(0, len(parts), 2):  # odd indexes hold the separators themselves
        name, equals, value = parts[i].partition("=")
        if equals and value and _names_the_token(name):
            parts[i] = f"{name}={REDACTED}"
    return "?" + "".join(parts)


def redact_access_token(text: str) -> str:
    """*text* with the value of every query parameter named ``access_token`` replaced by ``[redacted]``.

    The name is compared after percent-decoding (``access%5Ftoken`` is
    Starlette's ``access_token`` too), so no encoding of it slips through;
    other parameters and the rest of the text are left as they are.
    """
    if "?" not in text or "=" not in text:
        return text
    return _QUERY_IN_TEXT.sub(_redact_query, text)


def _redacted(value: Any) -> Any:
    return redact_access_token(value) if isinstance(value, str) else value


class RedactAccessToken(logging.Filter):
    """A logging filter that redacts ``access_token`` query values in a record's message and arguments.

    uvicorn's access log passes the request path (query string included, as
    sent: still percent-encoded) as an argument, so the token an
    ``EventSource`` sends in the URL would be written to the log in clear.
    The parameter's name is matched after decoding (see
    :func:`redact_access_token`). Thread: any (logging calls it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_redacted(a) for a in args)
        elif isinstance(args, dict):  # logging's single-mapping form: "%(path)s" % {"path": ...}
            record.args = {k: _redacted(v) for k, v in args.items()}
        if isinstance(record.msg, str):
            record.msg = redact_access_token(record.msg)
        return True


def _redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactAccessToken) for f in access.filters):
        access.addFilter(RedactAccessToken())


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class AdminAuth:
    """The admin router's credentials and the dependencies that check them.

    ``require`` checks the ``Authorization`` header; ``require_stream`` also
    accepts ``?access_token=`` (for ``EventSource``). Both are ``async def``
    so they never borrow a thread. Thread: the server's event loop.
    """

    def __init__(self, token: str | None, *, allow_unauthenticated: bool, where: str = "tokengate admin") -> None:
        resolved = resolve_admin_token(token)
        self._expected: bytes | None = None if resolved is None else _digest(resolved)
        self.mode: AuthMode
        if resolved is not None:
            self.mode = "token"
            _redact_access_log()
            if len(resolved) < _SHORT_TOKEN:
                logger.warning("%s: the admin token is only %d characters; use at least %d random ones",
                               where, len(resolved), _SHORT_TOKEN)
        elif allow_unauthenticated:
            self.mode = "unauthenticated"
            logger.warning("%s: NO AUTHENTICATION (allow_unauthenticated=True); anyone who can reach the "
                           "admin routes can drain, pause and kill work. Development only.", where)
        else:
            self.mode = "unconfigured"
            logger.warning("%s: no admin token configured; protected admin routes will answer 503 until "
                           "%s is set or admin_router(token=...) is given", where, ENV_VAR)
        # auto_error=False: we answer missing credentials ourselves (common error body, and 503
        # before 401 when nothing is configured); the scheme still puts the lock in OpenAPI.
        bearer = HTTPBearer(auto_error=False, scheme_name="TokengateAdminToken",
                            description=f"The tokengate admin token (admin_router(token=...) or ${ENV_VAR}).")

        async def require(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            self.check(None if credentials is None else credentials.credentials)

        async def require_stream(
            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
            access_token: str | None = Query(
                None, description="The admin token, for EventSource clients that cannot send headers "
                                  "(prefer the Authorization header: URLs reach access logs)."),
        ) -> None:
            self.check(credentials.credentials if credentials is not None else access_token)

        self.require = require
        self.require_stream = require_stream

    def check(self, presented: str | None) -> None:
        """Accept or refuse *presented* credentials (None = none were sent).

        Raises:
            AdminError: 503 when no token is configured (and no opt-in), 401
                with ``WWW-Authenticate`` when the credentials are missing or wrong.
        """
        expected = self._expected
        if expected is None:
            if self.mode == "unauthenticated":
                return
            raise AdminError(503, ErrorCode.ADMIN_TOKEN_NOT_CONFIGURED, NOT_CONFIGURED_MESSAGE)
        if presented is None:
            raise AdminError(401, ErrorCode.UNAUTHORIZED,
                             "missing admin token; send `Authorization: Bearer <token>`",
                             headers={"WWW-Authenticate": 'Bearer realm="tokengate"'})
        if not secrets.compare_digest(_digest(presented), expected):
            raise AdminError(401, ErrorCode.UNAUTHORIZED, "invalid admin token",
                             headers={"WWW-Authenticate": 'Bearer realm="tokengate", error="invalid_token"'})
