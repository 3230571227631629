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
* ``CoordinatorNotRunning`` → 503 ``coordinator_not_running`` with ``Retry-After``;
* the process lane's errors (``ProcessLaneError``): ``WorkerCrashed`` (the worker
  process running the call died) → 502 ``worker_crashed`` with ``pid``,
  ``exitcode``, ``signal_name``; ``WorkerTerminated`` → 502 ``worker_terminated``
  with ``pid``, ``reason``; ``WorkerStartFailed`` → 503 ``worker_start_failed`` and
  ``LaneClosed`` → 503 ``lane_closed``, both with ``Retry-After``; ``PicklingFailed``
  (arguments or result could not cross to the worker process) → 500
  ``pickling_failed`` with ``direction``, ``type_name``; ``RemoteError`` (the
  function's own exception could not be sent back) → 500 ``remote_error`` with
  ``type_name`` (never the remote traceback); ``NestedCallRefused`` → 500
  ``nested_call_refused`` (a programming error: retrying cannot help);
* a refusal that is also a ``ConfigurationError`` (``StickyKeyError``: a
  ``sticky_key`` function that raised for these arguments) → 500
  ``call_misconfigured`` with ``operation_type`` and no ``Retry-After``: the
  server's own configuration refused the call, and retrying cannot help.

Why 502 for a crash: the call reached a worker process that died under it, as
a gateway reports an upstream that failed. Only that call failed; the process
is replaced, and the next request is served normally (the call may have run
partly, so the answer carries no ``Retry-After``: retry only idempotent work).

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
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import APIRoute
from fastapi.utils import create_model_field, is_body_allowed_for_status_code
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Receive, Scope, Send

from tokengate.errors import (
    ConfigurationError,
    CoordinatorNotRunning,
    CoordinatorStopped,
    GateClosed,
    LaneClosed,
    NestedCallRefused,
    OperationBlocked,
    Overloaded,
    PicklingFailed,
    ProcessLaneError,
    Rejected,
    RemoteError,
    TokengateError,
    TokenKilled,
    TokenQuarantined,
    TokenTimeout,
    WorkerCrashed,
    WorkerStartFailed,
    WorkerTerminated,
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
#: Retry-After hint when a worker process could not start (the next call starts it again).
WORKER_START_RETRY_AFTER = 1.0
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
    #: Not produced by tokengate: the code for an app's own answer to its function's exception
    #: (the example app's 500s), so such bodies validate against the documented ErrorBody.
    FUNCTION_FAILED = "function_failed"
    TOKEN_KILLED = "token_killed"
    COORDINATOR_STOPPED = "coordinator_stopped"
    COORDINATOR_NOT_RUNNING = "coordinator_not_running"
    # the process lane (ProcessLaneError and NestedCallRefused)
    WORKER_CRASHED = "worker_crashed"
    WORKER_TERMINATED = "worker_terminated"
    WORKER_START_FAILED = "worker_start_failed"
    LANE_CLOSED = "lane_closed"
    PICKLING_FAILED = "pickling_failed"
    REMOTE_ERROR = "remote_error"
    PROCESS_LANE_ERROR = "process_lane_error"
    NESTED_CALL_REFUSED = "nested_call_refused"
    #: A refusal that is a ConfigurationError too (StickyKeyError): the server's configuration, not load.
    CALL_MISCONFIGURED = "call_misconfigured"
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
    if isinstance(exc, LaneClosed):  # the Dask lane's ClusterDown: refused at submit while its scheduler is lost
        return ErrorCode.LANE_CLOSED
    return ErrorCode.REJECTED


def error_response(exc: TokengateError) -> JSONResponse | None:
    """The HTTP answer for a tokengate error (see the module table), or None if it has no mapping.

    Useful in an app's own handler, e.g. to add headers before returning it.
    Thread: any (builds a response object, touches nothing shared).
    """
    if isinstance(exc, TokenQuarantined):
        return _json(409, ErrorCode.TOKEN_QUARANTINED, str(exc), quarantine_id=exc.quarantine_id,
                     operation_type=exc.operation_type, trigger=exc.trigger)
    if isinstance(exc, Rejected) and isinstance(exc, ConfigurationError):
        return _json(500, ErrorCode.CALL_MISCONFIGURED, str(exc), operation_type=exc.operation_type)
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
    if isinstance(exc, NestedCallRefused):  # before its base class: a bug in the function, not a restart
        return _json(500, ErrorCode.NESTED_CALL_REFUSED, str(exc))
    if isinstance(exc, CoordinatorNotRunning):
        return _json(503, ErrorCode.COORDINATOR_NOT_RUNNING, str(exc), _retry_headers(NOT_RUNNING_RETRY_AFTER))
    if isinstance(exc, ProcessLaneError):
        return _process_lane_response(exc)
    return None


def _process_lane_response(exc: ProcessLaneError) -> JSONResponse:
    if isinstance(exc, WorkerCrashed):
        return _json(502, ErrorCode.WORKER_CRASHED, str(exc), pid=exc.pid, exitcode=exc.exitcode,
                     signal_name=exc.signal_name)
    if isinstance(exc, WorkerTerminated):
        return _json(502, ErrorCode.WORKER_TERMINATED, str(exc), pid=exc.pid, reason=exc.reason)
    if isinstance(exc, WorkerStartFailed):
        return _json(503, ErrorCode.WORKER_START_FAILED, str(exc), _retry_headers(WORKER_START_RETRY_AFTER))
    if isinstance(exc, LaneClosed):
        return _json(503, ErrorCode.LANE_CLOSED, str(exc), _retry_headers(NOT_RUNNING_RETRY_AFTER))
    if isinstance(exc, PicklingFailed):
        return _json(500, ErrorCode.PICKLING_FAILED, str(exc), direction=exc.direction, type_name=exc.type_name)
    if isinstance(exc, RemoteError):
        # The child's traceback stays in the server's log, never in an answer to a client.
        return _json(500, ErrorCode.REMOTE_ERROR, str(exc), type_name=exc.type_name)
    return _json(500, ErrorCode.PROCESS_LANE_ERROR, str(exc))


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
HANDLED_EXCEPTIONS: tuple[type[TokengateError], ...] = (Rejected, TokenKilled, TokenTimeout, CoordinatorNotRunning,
                                                         ProcessLaneError)


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
    elif code is ErrorCode.METHOD_NOT_ALLOWED:
        # Starlette's route lists only its own methods; another route may serve the same path.
        given = next((v for k, v in headers.items() if k.lower() == "allow"), "")
        allow = _allow_header(request.scope, {m.strip() for m in given.split(",") if m.strip()})
        headers = {k: v for k, v in headers.items() if k.lower() != "allow"}
        if allow:
            headers["Allow"] = allow
        if detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path}; use {allow or 'another method'}"
    return _json(exc.status_code, code, detail, headers)


_PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allow_header(scope: Scope, own: set[str]) -> str:
    """``Allow`` for a 405: *own* methods plus every method another route of the app serves on this path.

    Starlette answers 405 from the first route whose path matched, so for a
    path served by two routes (``GET`` and ``DELETE /quarantine/{id}``) its
    ``Allow`` would name one method only. Each method is probed with the
    public ``matches()`` of the app router's routes (included routers too)
    on a fresh scope; runs only on a 405.
    """
    methods = set(own)
    router = scope.get("router")
    routes = getattr(router, "routes", None) or ()
    for method in _PROBED_METHODS:
        if method in methods:
            continue
        probe: dict[str, Any] = {key: scope[key] for key in ("type", "path", "raw_path", "root_path", "app_root_path")
                                 if key in scope}
        probe.update(method=method, headers=[], query_string=b"")
        for route in routes:
            try:
                match, _ = route.matches(probe)
            except Exception:  # a foreign route type: it cannot widen the answer, it must not break it
                continue
            if match is Match.FULL:
                methods.add(method)
                break
    return ", ".join(sorted(methods))


def _model_fields(route: APIRoute, responses: Mapping[int | str, Mapping[str, Any]]) -> dict[int | str, Any]:
    # The model fields FastAPI builds for `responses=` entries in APIRoute.__init__, for entries added later.
    return {status: create_model_field(name=f"Response_{status}_{route.unique_id}", type_=entry["model"],
                                       mode="serialization")
            for status, entry in responses.items() if entry.get("model") is not None}


class AdminRoute(APIRoute):
    """Route class of the admin router: renders its errors with the common body.

    Admin routes answer ``AdminError``, the mapped tokengate errors, malformed
    input (422 ``invalid_argument``, with FastAPI's ``errors`` list) and a
    method the route does not serve (405 ``method_not_allowed`` with
    ``Allow``) in the ``{"error", "detail"}`` shape even if the app never
    called :func:`add_exception_handlers`.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        """An ``APIRoute`` whose OpenAPI entry documents every error body it can answer.

        Added to what the route declares: 404 on a route with a path
        parameter (a value that cannot be addressed, e.g. one with a line
        break, matches no route) and 422 on a route that takes input, both as
        :class:`~tokengate_fastapi.schemas.ErrorBody`. On a route whose
        success is not JSON (``/events``: ``text/event-stream``), error bodies
        are documented as ``application/json``, which is what they are.
        """
        from .schemas import error_responses  # schemas imports this module: import when routes are built

        responses: dict[int | str, dict[str, Any]] = dict(kwargs.pop("responses", None) or {})
        if "{" in path and 404 not in responses:
            responses.update(error_responses(404))
        super().__init__(path, endpoint, responses=responses, **kwargs)
        if (get_flat_params(self.dependant) or self.body_field is not None) and 422 not in self.responses:
            self.responses.update(error_responses(422))
            self.response_fields.update(_model_fields(self, error_responses(422)))
        self._document_errors_as_json()

    def _document_errors_as_json(self) -> None:
        # FastAPI documents a `model` response under the route's own media type; for a stream
        # that would claim its 401/422/503 bodies are text/event-stream. Give those an explicit
        # application/json schema, and keep each model field (under a key that is not a status)
        # so FastAPI still registers ErrorBody among the components the $ref points to.
        response_class = self.response_class
        if isinstance(response_class, DefaultPlaceholder):
            response_class = response_class.value
        media_type = getattr(response_class, "media_type", None)
        if media_type in (None, "application/json"):
            return
        self._document_stream_as_items(media_type)
        for status in list(self.responses):
            field = self.response_fields.pop(status, None)
            if field is None:
                continue
            entry = {k: v for k, v in self.responses[status].items() if k != "model"}
            model_name = self.responses[status]["model"].__name__
            entry["content"] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model_name}"}}}
            self.responses[status] = entry
            self.response_fields[f"x-json-error-{status}"] = field

    def _document_stream_as_items(self, media_type: str) -> None:
        # FastAPI documents a non-JSON success as `schema: {"type": "string"}`. Next to an
        # `itemSchema` (one event of a stream), OpenAPI 3.2 and schemathesis read `schema` as the
        # whole stream, i.e. the list of events: say that, unless the route gave its own schema.
        for status, entry in self.responses.items():
            media = (entry.get("content") or {}).get(media_type)
            if not isinstance(media, dict) or "itemSchema" not in media or "schema" in media:
                continue
            stream = {"type": "array", "items": media["itemSchema"]}
            extra = dict(self.openapi_extra or {})
            extra_responses = dict(extra.get("responses") or {})
            extra_responses[str(status)] = {"content": {media_type: {"schema": stream}}}
            extra["responses"] = extra_responses
            self.openapi_extra = extra

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request, or answer 405 in the common body when the method is not this route's."""
        if self.methods and scope["method"] not in self.methods:
            allow = _allow_header(scope, set(self.methods))
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
