"""Admin authentication fails closed: every protected route without, with wrong, with right credentials,
with no token configured, and in the explicit unauthenticated development mode."""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tokengate import ConfigurationError
from tokengate_fastapi import admin_router
from tokengate_fastapi.auth import RedactAccessToken, redact_access_token

pytestmark = pytest.mark.anyio

P = "/tokengate"

#: Every route that needs the token by default (method, path, the status a valid token gets).
PROTECTED: list[tuple[str, str, int]] = [
    ("GET", "/stats", 200),
    ("GET", "/affinity", 200),
    ("GET", "/workers", 200),
    ("GET", "/history", 200),
    ("GET", "/tokens/1", 404),
    ("POST", "/tokens/1/kill", 404),
    ("GET", "/operations", 200),
    ("POST", "/operations/auth.op/pause", 200),
    ("POST", "/operations/auth.op/resume", 200),
    ("POST", "/operations/auth.op/unblock", 404),
    ("POST", "/operations/auth.op/hold", 404),
    ("POST", "/operations/auth.op/unhold", 404),
    ("POST", "/operations/auth.op/kill", 200),
    # operation types with "/" (plain or %2F) reach the same protected routes
    ("POST", "/operations/auth/op/pause", 200),
    ("POST", "/operations/auth%2Fop/resume", 200),
    ("POST", "/operations/auth/op/pause/kill", 200),
    ("GET", "/quarantine", 200),
    ("GET", "/quarantine/q1", 404),
    ("POST", "/quarantine/q1/release", 404),
    ("DELETE", "/quarantine/q1", 404),
    ("POST", "/drain?wait=false", 200),
    ("POST", "/pause", 200),
    ("POST", "/resume", 200),
    ("GET", "/metrics", 200),
    ("GET", "/events?max_events=1", 200),
]
PUBLIC: list[tuple[str, str]] = [("GET", "/health"), ("GET", "/ready"), ("GET", "/dashboard")]


async def _call_all(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, httpx.Response]:
    answers = {}
    for method, path, _ in PROTECTED:
        answers[f"{method} {path}"] = await client.request(method, P + path, headers=headers)
    await client.post(f"{P}/resume", headers=headers)  # never leave the pool drained or paused
    return answers


async def test_every_protected_route_with_the_right_token(make_app: Callable[..., FastAPI],
                                                          serve: Callable[..., Any], auth: dict[str, str]) -> None:
    async with serve(make_app()) as client:
        answers = await _call_all(client, auth)
    for method, path, status in PROTECTED:
        assert answers[f"{method} {path}"].status_code == status, (method, path)


BAD_CREDENTIALS: list[tuple[dict[str, str], str]] = [
    ({}, 'Bearer realm="tokengate"'),
    ({"Authorization": "Bearer wrong-token-0123456789"}, 'Bearer realm="tokengate", error="invalid_token"'),
    ({"Authorization": "Bearer " + "x" * 500}, 'Bearer realm="tokengate", error="invalid_token"'),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, 'Bearer realm="tokengate"'),
    ({"Authorization": "Bearer"}, 'Bearer realm="tokengate"'),
]


async def test_missing_or_wrong_credentials_are_401_everywhere(make_app: Callable[..., FastAPI],
                                                               serve: Callable[..., Any]) -> None:
    app = make_app()
    async with serve(app) as client:
        for headers, www_authenticate in BAD_CREDENTIALS:
            answers = await _call_all(client, headers)
            for key, response in answers.items():
                assert response.status_code == 401, (key, headers)
                assert response.headers["www-authenticate"] == www_authenticate, (key, headers)
                assert response.json()["error"] == "unauthorized", key
                assert "set-cookie" not in response.headers
        # Then: no protected route leaked or changed anything
        assert not app.state.tokengate.draining and not app.state.tokengate.paused
        assert app.state.tokengate.stats()["paused_operations"] == []


async def test_no_token_configured_fails_closed_with_503(make_app: Callable[..., FastAPI],
                                                         serve: Callable[..., Any], auth: dict[str, str]) -> None:
    # Given: no token argument and no TOKENGATE_ADMIN_TOKEN
    app = make_app(router={"token": None})
    async with serve(app) as client:
        answers = await _call_all(client, auth)  # even a plausible header does not help
        public = [await client.request(m, P + p) for m, p in PUBLIC]
    for key, response in answers.items():
        assert response.status_code == 503, key
        body = response.json()
        assert body["error"] == "admin_token_not_configured", key
        assert "TOKENGATE_ADMIN_TOKEN" in body["detail"] and "admin_router(token=...)" in body["detail"]
    # the probes and the (data-free) dashboard page stay open
    assert [r.status_code for r in public] == [200, 200, 200]


async def test_allow_unauthenticated_opens_every_route_and_warns(make_app: Callable[..., FastAPI],
                                                                 serve: Callable[..., Any],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # Given: the explicit development opt-in, and no token
    with caplog.at_level(logging.WARNING, logger="tokengate_fastapi.auth"):
        app = make_app(router={"token": None, "allow_unauthenticated": True})
    warnings = [r for r in caplog.records if "NO AUTHENTICATION" in r.getMessage()]
    assert len(warnings) == 1  # once, when the router is built
    async with serve(app) as client:
        answers = await _call_all(client, {})
    for method, path, status in PROTECTED:
        assert answers[f"{method} {path}"].status_code == status, (method, path)


async def test_a_configured_token_wins_over_allow_unauthenticated(make_app: Callable[..., FastAPI],
                                                                  serve: Callable[..., Any]) -> None:
    async with serve(make_app(router={"allow_unauthenticated": True})) as client:
        assert (await client.get(f"{P}/stats")).status_code == 401


async def test_token_from_the_environment_read_when_the_router_is_built(
        make_app: Callable[..., FastAPI], serve: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: the token only in the environment when admin_router() runs
    monkeypatch.setenv("TOKENGATE_ADMIN_TOKEN", "env-token-0123456789abcdef")
    app = make_app(router={"token": None})
    monkeypatch.setenv("TOKENGATE_ADMIN_TOKEN", "changed-later-0123456789")  # not re-read per request
    async with serve(app) as client:
        ok = await client.get(f"{P}/stats", headers={"Authorization": "Bearer env-token-0123456789abcdef"})
        later = await client.get(f"{P}/stats", headers={"Authorization": "Bearer changed-later-0123456789"})
    assert ok.status_code == 200 and later.status_code == 401


async def test_events_accept_the_token_as_a_query_parameter(make_app: Callable[..., FastAPI],
                                                            serve: Callable[..., Any], admin_token: str) -> None:
    async with serve(make_app()) as client:
        ok = await client.get(f"{P}/events", params={"access_token": admin_token, "max_events": 1})
        wrong = await client.get(f"{P}/events", params={"access_token": "nope", "max_events": 1})
        # the query parameter is only for the event stream
        other = await client.get(f"{P}/stats", params={"access_token": admin_token})
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/event-stream")
    assert wrong.status_code == 401 and other.status_code == 401


async def test_probes_and_metrics_visibility_options(make_app: Callable[..., FastAPI], serve: Callable[..., Any],
                                                     auth: dict[str, str]) -> None:
    # Given: private probes and public metrics
    async with serve(make_app(router={"public_health": False, "public_metrics": True})) as client:
        # Then: probes need the token, metrics do not
        assert (await client.get(f"{P}/health")).status_code == 401
        assert (await client.get(f"{P}/ready")).status_code == 401
        assert (await client.get(f"{P}/health", headers=auth)).status_code == 200
        assert (await client.get(f"{P}/metrics")).status_code == 200


@pytest.mark.parametrize("options, match", [
    ({"token": ""}, "non-empty"),
    ({"token": "has space inside"}, "whitespace"),
    ({"token": 12345}, "non-empty string"),
    ({"sse_interval": 0}, "sse_interval"),
    ({"sse_interval": float("inf")}, "sse_interval"),
    ({"sse_max_duration": -1}, "sse_max_duration"),
    ({"sse_max_streams": 0}, "sse_max_streams"),
    ({"sse_max_streams": 100_001}, "sse_max_streams"),
    ({"sse_max_streams": 2.0}, "sse_max_streams"),
    ({"sse_max_streams": True}, "sse_max_streams"),
    ({"name_prefix": ""}, "name_prefix"),
])
def test_bad_router_options_fail_at_construction(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        admin_router(**options)


def test_short_token_and_unconfigured_router_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tokengate_fastapi.auth"):
        admin_router(token="short")
        admin_router()
    messages = [r.getMessage() for r in caplog.records]
    assert any("only 5 characters" in m for m in messages)
    assert any("no admin token configured" in m for m in messages)


def test_access_log_redacts_the_query_token() -> None:
    # Given: a token-protected router was built (it installs the filter on uvicorn's access logger)
    admin_router(token="redact-me-0123456789abcdef")
    access = logging.getLogger("uvicorn.access")
    assert sum(isinstance(f, RedactAccessToken) for f in access.filters) == 1
    admin_router(token="redact-me-0123456789abcdef")
    assert sum(isinstance(f, RedactAccessToken) for f in access.filters) == 1  # installed once
    # When: uvicorn logs an EventSource request
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', (
        "127.0.0.1:5000", "GET", "/tokengate/events?access_token=redact-me-0123456789abcdef&max_events=2", "1.1",
        200), None)
    assert RedactAccessToken().filter(record)
    # Then: the token is gone, the rest of the line stays
    assert record.getMessage() == (
        '127.0.0.1:5000 - "GET /tokengate/events?access_token=[redacted]&max_events=2 HTTP/1.1" 200')


SECRET = "redact-me-0123456789abcdef"


@pytest.mark.parametrize("query, logged", [
    # every spelling of the name that Starlette decodes to access_token (so it authenticates)
    (f"access_token={SECRET}&max_events=1", "access_token=[redacted]&max_events=1"),
    (f"access%5Ftoken={SECRET}&max_events=1", "access%5Ftoken=[redacted]&max_events=1"),
    (f"access%5ftoken={SECRET}&max_events=1", "access%5ftoken=[redacted]&max_events=1"),
    (f"%61ccess_token={SECRET}&max_events=1", "%61ccess_token=[redacted]&max_events=1"),
    (f"max_events=1&%61%63%63%65%73%73%5F%74%6F%6B%65%6E={SECRET}",
     "max_events=1&%61%63%63%65%73%73%5F%74%6F%6B%65%6E=[redacted]"),
    # repeated (FastAPI takes the last one: both go), and a value holding '='
    (f"access_token=x&access_token={SECRET}", "access_token=[redacted]&access_token=[redacted]"),
    (f"access_token={SECRET}%3D%3D=", "access_token=[redacted]"),
    # spellings that do not authenticate but still carry the secret
    (f"access%255Ftoken={SECRET}", "access%255Ftoken=[redacted]"),
    (f"ACCESS_TOKEN={SECRET}", "ACCESS_TOKEN=[redacted]"),
    (f"a=1;access_token={SECRET}", "a=1;access_token=[redacted]"),
])
def test_redaction_matches_the_decoded_parameter_name(query: str, logged: str) -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', (
        "127.0.0.1:5000", "GET", f"/tokengate/events?{query}", "1.1", 200), None)
    assert RedactAccessToken().filter(record)
    assert record.getMessage() == f'127.0.0.1:5000 - "GET /tokengate/events?{logged} HTTP/1.1" 200'
    assert SECRET not in record.getMessage()


@pytest.mark.parametrize("text", [
    "/tokengate/events?max_events=1&other_token=abc", "/tokengate/stats", "no query = here",
    "/x?access_token=&y=1", "/x?access_token", "/x?my_access_token=abc",
])
def test_redaction_leaves_everything_else_alone(text: str) -> None:
    assert redact_access_token(text) == text


def test_redaction_covers_the_message_and_mapping_arguments() -> None:
    formatted = logging.LogRecord("x", logging.INFO, __file__, 1, f"GET /e?access%5Ftoken={SECRET} 200", None, None)
    mapping = logging.LogRecord("x", logging.INFO, __file__, 1, "GET %(path)s", ({"path": f"/e?access_token={SECRET}"},),
                                None)
    for record in (formatted, mapping):
        assert RedactAccessToken().filter(record)
        assert SECRET not in record.getMessage() and "[redacted]" in record.getMessage()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(port: int, target: str) -> bytes:
    """One raw HTTP/1.1 GET (the target exactly as written: no client re-encodes it); the status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_real_uvicorn_access_log_never_shows_the_token(make_app: Callable[..., FastAPI],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    # Given: a real uvicorn on 127.0.0.1 writing its access log, serving a token-protected router
    app = make_app(router={"token": SECRET})
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=True,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-auth-test", daemon=True)
    targets = [f"/tokengate/events?access%5Ftoken={SECRET}&max_events=1",
               f"/tokengate/events?%61ccess_token={SECRET}&max_events=1",
               f"/tokengate/events?max_events=1&access_token={SECRET}"]
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        thread.start()
        try:
            for _ in range(500):  # bounded: about 10 s
                if server.started:
                    break
                threading.Event().wait(0.02)  # another thread's flag: there is no event to wait on
            assert server.started
            # When: EventSource-style requests carry the token under encoded names
            statuses = [_get(port, target) for target in targets]
        finally:
            server.should_exit = True
            thread.join(15)
        assert not thread.is_alive()
    # Then: each one authenticated (the bypass is real) and the access log never shows the token
    assert statuses == [b"HTTP/1.1 200 OK"] * 3
    access = [r.getMessage() for r in caplog.records if r.name == "uvicorn.access"]
    assert len(access) == 3
    assert all(SECRET not in line and "=[redacted]" in line for line in access), access
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_a_rejected_token_is_never_echoed() -> None:
    with pytest.raises(ConfigurationError) as caught:
        admin_router(token="almost secret value")
    assert "almost" not in str(caught.value) and "19 characters" in str(caught.value)


MALFORMED_BODIES = [b"{bad", b"\xff\xfe", b'{"timeout": 1e999}', b'{"wait": "maybe"}']


async def test_a_malformed_body_without_credentials_is_401_not_422(make_app: Callable[..., FastAPI],
                                                                   serve: Callable[..., Any]) -> None:
    # Given: a token is configured, and a client without it sends a malformed drain body
    async with serve(make_app()) as client:
        for raw in MALFORMED_BODIES:
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
                response = await client.post(f"{P}/drain", content=raw,
                                             headers={**headers, "content-type": "application/json"})
                # Then: credentials are checked before the body is even parsed
                assert response.status_code == 401, (raw, headers)
                assert response.json()["error"] == "unauthorized", (raw, headers)
                assert response.headers["www-authenticate"].startswith("Bearer"), (raw, headers)


async def test_a_malformed_body_with_no_token_configured_is_503(make_app: Callable[..., FastAPI],
                                                                serve: Callable[..., Any]) -> None:
    app = make_app(router={"token": None})
    async with serve(app) as client:
        for raw in MALFORMED_BODIES:
            response = await client.post(f"{P}/drain", content=raw, headers={"content-type": "application/json"})
            assert response.status_code == 503, raw
            assert response.json()["error"] == "admin_token_not_configured", raw
        assert not app.state.tokengate.draining
