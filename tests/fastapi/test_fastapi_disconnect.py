"""A client that disconnects while its call is queued kills that call (real uvicorn on 127.0.0.1).

uvicorn does not cancel a handler when its client goes away; CancelOnDisconnectMiddleware does, and
cancelling the task that awaits a token kills the token if it has not started.
"""

from __future__ import annotations

import queue
import socket
import threading
from typing import Any, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from tokengate import Policy, TaskToken, TokenState, task_token_guard
from tokengate_fastapi import CancelOnDisconnectMiddleware, tokengate_lifespan

GATE = threading.Event()
STARTED = threading.Event()
BOUND = 10.0  # seconds any single wait may take before the test fails (never reached when healthy)


@task_token_guard(operation_type="disc.block", tags={"weight": "light"})
def block() -> str:
    STARTED.set()
    GATE.wait(BOUND)
    return "done"


class Probe(Policy):
    """Reports routing and settlement of every token (events instead of sleeps)."""

    name = "probe"

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, str, str]] = queue.Queue()

    def on_routed(self, token: TaskToken[Any], core: int) -> None:
        self.events.put(("routed", token.token_id, token.state.value))

    def on_settle(self, token: TaskToken[Any]) -> None:
        self.events.put(("settled", token.token_id, token.state.value))

    def next(self, kind: str) -> tuple[str, str]:
        while True:
            event_kind, token_id, state = self.events.get(timeout=BOUND)
            if event_kind == kind:
                return token_id, state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server() -> Iterator[tuple[int, Probe]]:
    """uvicorn in a thread serving an app whose only worker can be blocked; stopped at teardown."""
    GATE.clear()
    STARTED.clear()
    probe = Probe()
    app = FastAPI(lifespan=tokengate_lifespan(num_cores=1, workers_per_core=1, policies=[probe],
                                              name="tgtest-disc", drain_timeout=BOUND))
    app.add_middleware(CancelOnDisconnectMiddleware)

    @app.get("/block")
    async def run_block() -> dict[str, str]:
        return {"result": await block()}

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        with httpx.Client(timeout=BOUND) as client:  # wait until it answers (bounded)
            for _ in range(int(BOUND / 0.02)):
                if instance.started:
                    break
                threading.Event().wait(0.02)  # polling another thread's flag: there is no event to wait on
            assert instance.started
            assert client.get(f"http://127.0.0.1:{port}/docs").status_code == 200
        yield port, probe
    finally:
        GATE.set()
        instance.should_exit = True
        thread.join(BOUND)
        assert not thread.is_alive()


def _send_request(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    sock.sendall(b"GET /block HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def _read_response(sock: socket.socket) -> bytes:
    """Read one HTTP/1.1 response with a Content-Length (the socket timeout bounds every read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_disconnected_client_kills_its_queued_call(server: tuple[int, Probe]) -> None:
    port, probe = server
    # Given: request 1 occupies the only worker
    first = _send_request(port)
    first_id, _ = probe.next("routed")
    assert STARTED.wait(BOUND)
    # and request 2's call waits in the mailbox behind it
    second = _send_request(port)
    second_id, state = probe.next("routed")
    assert second_id != first_id and state == TokenState.ADMITTED.value
    # When: client 2 goes away before its call started
    second.close()
    # Then: its call is killed without ever running
    settled_id, settled_state = probe.next("settled")
    assert (settled_id, settled_state) == (second_id, TokenState.KILLED.value)
    # and request 1 is unaffected
    GATE.set()
    answer = _read_response(first)
    first.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"done"' in answer
    assert probe.next("settled") == (first_id, TokenState.COMPLETED.value)


# -- the middleware in-process: everything else passes through unchanged ---------------------


def _echo_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(CancelOnDisconnectMiddleware)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = b""
        async for chunk in request.stream():
            body += chunk
        return {"size": len(body)}

    @app.get("/fail")
    async def fail() -> None:
        raise RuntimeError("boom")

    return app


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_middleware_passes_bodies_and_errors_through(anyio_backend: str) -> None:
    transport = httpx.ASGITransport(app=_echo_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        async def chunks() -> Any:
            for _ in range(5):
                yield b"x" * 1000

        assert (await client.post("/echo", content=chunks())).json() == {"size": 5000}
        assert (await client.post("/echo", content=b"abc")).json() == {"size": 3}
        assert (await client.get("/fail")).status_code == 500
