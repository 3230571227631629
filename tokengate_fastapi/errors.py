"""Turn tokengate's refusals into HTTP answers, in one place.

``add_exception_handlers(app)`` installs one handler for the whole tokengate
error vocabulary. Every answer has the same JSON body::

    {"error": "<ErrorCode>", "detail": "<message>", ...extra fields}

* ``Overloaded`` → 503 ``overloaded``, ``GateClosed`` (draining or stopping) → 503
  ``gate_closed``, ``OperationBlocked`` → 503 ``operation_blocked``, any other
  ``Rejected`` (a policy's own) → 503 ``rejected``: all with ``Retry-After`` and
  ``operation_type`` (plus ``retry_after``, ``reason``);
* ``TokenQuarantined`` → 409 ``token_quarantined`` with ``quarantine_id``,
  ``operation_type``, ``trigger``;
* ``TokenTimeout`` → 504 ``token_timeout`` with ``token_id``, ``timeout``, ``started``;
* ``TokenKilled`` → 409 ``token_killed`` with ``token_id``, ``reason``;
  its subclass ``CoordinatorStopped`` → 503 ``coordinator_stopped`` with ``Retry-After``;
* ``CoordinatorNotRunning`` → 503 ``coordinator_not_running`` with ``Retry-After``.

Malformed input is not a tokengate error: the admin routes answer it with 422
``invalid_argument`` themselves, and an app can give its own endpoints the
same body with ``app.add_exception_handler(RequestValidationError,
request_validation_exception_handler)``. Starlette's own HTTP errors (an
unknown path, a method the route does not serve) get it with
``app.add_exception_handler(HTTPException, http_exception_handler)``: 404
``not_found``, 405 ``method_not_allowed`` (with ``Allow``), any other status
``http_error``.

Why 409 and not 202 for a quarantined call: 202 Accepted promises the request
"will be processed", and the client would have nothing to poll. A quarantined
call was *not* run and runs only if an operator releases it (as a new token the
client never sees). So the answer is 409 Conflict, "this operation is held
for review", with ``quarantine_id`` so the client can quote it to an operator.

``Retry-After`` is always an integer number of seconds, at least 1, taken from
the exception's ``retry_after`` hint.

The domain errors stay HTTP-free (``tokengate.errors``); this module is the
only place that knows status codes.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, Callable, Coroutine, Mapping

from fastapi import Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.utils import is_body_allowed_for_status_code
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from tokengate.errors import (
    ConfigurationError,
    CoordinatorNotRunning,
    CoordinatorStopped,
    GateClosed,
    OperationBlocked,
    Overloaded,
    Rejected,
    TokengateError,
    TokenKilled,
    TokenQuarantined,
    TokenTimeout,
)

__all__ = [
    "ErrorCode",
    "AdminError",
    "AdminRoute",
    "add_exception_handlers",
    "error_response",
    "http_exception_handler",
    "request_validation_exception_handler",
    "retry_after_header",
    "tokengate_exception_handler",
]


#: Retry-After hint when the coordinator is not running (restart or shutdown in progress).
NOT_RUNNING_RETRY_AFTER = 5.0
_MAX_RETRY_AFTER = 86_400


class ErrorCode(str, enum.Enum):
    """The stable ``error`` value of every error body (clients switch on this, never on ``detail``)."""

    # refusals and outcomes of calls (add_exception_handlers)
    OVERLOADED = "overloaded"
    GATE_CLOSED = "gate_closed"
    OPERATION_BLOCKED = "operation_blocked"
    REJECTED = "rejected"
    TOKEN_QUARANTINED = "token_quarantined"
    TOKEN_TIMEOUT = "token_timeout"
    TOKEN_KILLED = "token_killed"
    COORDINATOR_STOPPED = "coordinator_stopped"
    COORDINATOR_NOT_RUNNING = "coordinator_not_running"
    # the admin API
    UNAUTHORIZED = "unauthorized"
    ADMIN_TOKEN_NOT_CONFIGURED = "admin_token_not_configured"
    INVALID_ARGUMENT = "invalid_argument"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    # Starlette's own HTTP errors (http_exception_handler)
    NOT_FOUND = "not_found"
    HTTP_ERROR = "http_error"
    TOKEN_NOT_FOUND = "token_not_found"
    TOKEN_EXECUTING = "token_executing"
    TOKEN_ALREADY_SETTLED = "token_already_settled"
    POLICY_NOT_INSTALLED = "policy_not_installed"
    POLICY_INCOMPATIBLE = "policy_incompatible"
    QUARANTINE_NOT_FOUND = "quarantine_not_found"
    QUARANTINE_CONFLICT = "quarantine_conflict"


class AdminError(Exception):
    """Raised inside admin routes to answer with an error body (rendered by :class:`AdminRoute`).

    Internal to tokengate_fastapi: it never escapes an admin route, so apps
    need no handler for it.
    """

    def __init__(
        self,
        status_code: int,
        code: ErrorCode,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def response(self) -> JSONResponse:
        """The error as a JSON answer with its status and headers."""
        return _json(self.status_code, self.code, self.detail, self.headers, **self.extra)


def retry_after_header(seconds: float | None) -> str:
    """Format a retry hint as ``Retry-After``: whole seconds, at least 1 (rounded up)."""
    if seconds is None or not isinstance(seconds, (int, float)) or math.isnan(seconds) or seconds < 1:
        return "1"
    if math.isinf(seconds) or seconds > _MAX_RETRY_AFTER:
        return str(_MAX_RETRY_AFTER)
    return str(math.ceil(seconds))


def _json(status: int, code: ErrorCode, detail: str, headers: Mapping[str, str] | None = None,
          **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": code.value, "detail": detail}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=dict(headers) if headers else None)


def _retry_headers(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": retry_after_header(seconds)}


def _rejected_code(exc: Rejected) -> ErrorCode:
    if isinstance(exc, Overloaded):
        return ErrorCode.OVERLOADED
    if isinstance(exc, GateClosed):
        return ErrorCode.GATE_CLOSED
    if isinstance(exc, OperationBlocked):
        return ErrorCode.OPERATION_BLOCKED
    return ErrorCode.REJECTED


def error_response(exc: TokengateError) -> JSONResponse | None:
    """The HTTP answer for a tokengate error (see the module table), or None if it has no mapping.

    Useful in an app's own handler, e.g. to add headers before returning it.
    Thread: any (builds a response object, touches nothing shared).
    """
    if isinstance(exc, TokenQuarantined):
        return _json(409, ErrorCode.TOKEN_QUARANTINED, str(exc), quarantine_id=exc.quarantine_id,
                     operation_type=exc.operation_type, trigger=exc.trigger)
    if isinstance(exc, Rejected):
        retry_after: float | None = getattr(exc, "retry_after", None)
        extra: dict[str, Any] = {"operation_type": exc.operation_type, "reason": exc.reason}
        if retry_after is not None:
            extra["retry_after"] = retry_after
        return _json(503, _rejected_code(exc), str(exc), _retry_headers(retry_after), **extra)
    if isinstance(exc, CoordinatorStopped):
        return _json(503, ErrorCode.COORDINATOR_STOPPED, str(exc), _retry_headers(NOT_RUNNING_RETRY_AFTER),
                     token_id=exc.token_id)
    if isinstance(exc, TokenKilled):
        return _json(409, ErrorCode.TOKEN_KILLED, str(exc), token_id=exc.token_id, reason=exc.reason)
    if isinstance(exc, TokenTimeout):
        return _json(504, ErrorCode.TOKEN_TIMEOUT, str(exc), token_id=exc.token_id, timeout=exc.timeout,
                     started=exc.started)
    if isinstance(exc, CoordinatorNotRunning):
        return _json(503, ErrorCode.COORDINATOR_NOT_RUNNING, str(exc), _retry_headers(NOT_RUNNING_RETRY_AFTER))
    return None


async def tokengate_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler for the tokengate errors in the module table.

    Installed by :func:`add_exception_handlers`; an exception without a
    mapping is re-raised so Starlette answers 500 and logs it as usual.
    Thread: the server's event loop.
    """
    response = error_response(exc) if isinstance(exc, TokengateError) else None
    if response is None:
        raise exc
    return response


#: The classes add_exception_handlers registers; subclasses are found through the MRO.
HANDLED_EXCEPTIONS: tuple[type[TokengateError], ...] = (Rejected, TokenKilled, TokenTimeout, CoordinatorNotRunning)


def add_exception_handlers(app: Starlette) -> None:
    """Install :func:`tokengate_exception_handler` on *app* for every mapped tokengate error.

    Call it once after creating the app (``add_exception_handlers(app)``). A
    handler the app registers later for one of these classes (or a subclass)
    takes precedence, so single mappings can be overridden.
    """
    for exc_class in HANDLED_EXCEPTIONS:
        app.add_exception_handler(exc_class, tokengate_exception_handler)


def _json_safe(value: Any) -> Any:
    # JSON has no inf or nan, but Python's parser accepts them (`1e999`, `NaN`) and pydantic
    # echoes them back as the invalid input: send those as strings, not a 500 from the encoder.
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _invalid_request(exc: RequestValidationError) -> JSONResponse:
    errors = _json_safe(jsonable_encoder(exc.errors()))
    where = "; ".join(f"{'.'.join(str(part) for part in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
    return _json(422, ErrorCode.INVALID_ARGUMENT, f"invalid request: {where}", errors=errors)


async def request_validation_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler answering malformed input with 422 ``invalid_argument``.

    The body is the common ``{"error", "detail"}`` shape plus FastAPI's
    ``errors`` list (what the admin routes answer). Register it with
    ``app.add_exception_handler(RequestValidationError, request_validation_exception_handler)``.
    Thread: the server's event loop.
    """
    if not isinstance(exc, RequestValidationError):
        raise exc
    return _invalid_request(exc)


_HTTP_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


def _detail_text(detail: Any) -> str:
    # The body's detail is a string: a structured one (dict, list) travels as JSON text, never a repr.
    if isinstance(detail, str):
        return detail
    try:
        return json.dumps(_json_safe(jsonable_encoder(detail)), ensure_ascii=False)
    except (TypeError, ValueError):
        return str(detail)


def _no_route_matched(request: Request) -> bool:
    # A router sets the scope's endpoint when a route matches; a (mounted) app's router that
    # found none leaves it unset, or set to that app by the Mount that led to it.
    endpoint = request.scope.get("endpoint")
    return endpoint is None or endpoint is request.scope.get("app")


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler answering HTTP errors in the common ``{"error", "detail"}`` body.

    An unknown path is 404 ``not_found``, a method the route does not serve
    405 ``method_not_allowed`` (with Starlette's ``Allow`` header), any other
    status ``http_error`` with the exception's own detail. Register it with
    ``app.add_exception_handler(HTTPException, http_exception_handler)``
    (Starlette's ``HTTPException``; FastAPI's is a subclass). Thread: the
    server's event loop.
    """
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    headers = dict(exc.headers or {})
    if not is_body_allowed_for_status_code(exc.status_code):  # 1xx, 204, 205, 304
        return Response(status_code=exc.status_code, headers=headers)
    code = _HTTP_CODES.get(exc.status_code, ErrorCode.HTTP_ERROR)
    detail = _detail_text(exc.detail)
    # Starlette's router says only "Not Found" / "Method Not Allowed": say what was asked.
    # (A bare 404 of an endpoint that did match keeps its own detail: the route exists.)
    if code is ErrorCode.NOT_FOUND and detail == "Not Found" and _no_route_matched(request):
        detail = f"no route serves {request.url.path}"
    elif code is ErrorCode.METHOD_NOT_ALLOWED and detail == "Method Not Allowed":
        allow = next((v for k, v in headers.items() if k.lower() == "allow"), "another method")
        detail = f"{request.method} is not allowed on {request.url.path}; use {allow}"
    return _json(exc.status_code, code, detail, headers)


class AdminRoute(APIRoute):
    """Route class of the admin router: renders its errors with the common body.

    Admin routes answer ``AdminError``, the mapped tokengate errors, malformed
    input (422 ``invalid_argument``, with FastAPI's ``errors`` list) and a
    method the route does not serve (405 ``method_not_allowed`` with
    ``Allow``) in the ``{"error", "detail"}`` shape even if the app never
    called :func:`add_exception_handlers`.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request, or answer 405 in the common body when the method is not this route's."""
        if self.methods and scope["method"] not in self.methods:
            allow = ", ".join(sorted(self.methods))
            response = _json(405, ErrorCode.METHOD_NOT_ALLOWED,
                             f"{scope['method']} is not allowed on this route; use {allow}", {"Allow": allow})
            await response(scope, receive, send)
            return
        await super().handle(scope, receive, send)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admin_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except AdminError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return _invalid_request(exc)
            except ConfigurationError as exc:
                return _json(422, ErrorCode.INVALID_ARGUMENT, str(exc))
            except TokengateError as exc:
                response = error_response(exc)
                if response is None:
                    raise
                return response

        return admin_handler
