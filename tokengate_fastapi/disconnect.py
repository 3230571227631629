"""``CancelOnDisconnectMiddleware``: a client that goes away cancels its request handler.

Why it is needed: ASGI servers (uvicorn included) do not cancel a request
handler when the client disconnects; the handler learns of it only if it
reads ``receive()``. So an endpoint awaiting a token would keep its call
queued, and run it, for nobody. With this middleware the handler's task is
cancelled as soon as the server reports ``http.disconnect`` before the
response is complete; cancelling the task that awaits a token kills the
token if it has not started (``TaskToken.cancel``), and a running one
finishes on its thread with its result discarded.

Install it once::

    app = FastAPI(lifespan=tokengate_lifespan())
    app.add_middleware(CancelOnDisconnectMiddleware)

Note:
    It is pure ASGI (no ``BaseHTTPMiddleware``). It forwards every message
    unchanged and keeps the request body's backpressure: the next body chunk
    is read from the server only after the app took the previous one, so a
    disconnect during an unread upload is noticed when the app reads on.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CancelOnDisconnectMiddleware"]


class CancelOnDisconnectMiddleware:
    """Cancel an HTTP request's handler when its client disconnects before the response completes.

    Other scopes (websocket, lifespan) pass through untouched.
    Thread: the server's event loop.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbox: Deque[Message] = collections.deque()
        arrived = asyncio.Event()  # inbox got a message
        taken = asyncio.Event()  # the app took a message from inbox
        response_complete = False
        disconnected = False
        last: Message | None = None  # the http.disconnect, repeated to any later receive() like servers do

        async def app_receive() -> Message:
            while not inbox:
                if last is not None:
                    return last
                arrived.clear()
                await arrived.wait()
            taken.set()
            return inbox.popleft()

        async def app_send(message: Message) -> None:
            nonlocal response_complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # Servers answer receive() with http.disconnect once the response is
                # complete: from here on a disconnect is the normal end, not a reason to cancel.
                response_complete = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, app_receive, app_send))

        async def watch() -> None:
            nonlocal disconnected, last
            while True:
                message = await receive()
                inbox.append(message)
                if message["type"] == "http.disconnect":
                    last = message
                arrived.set()
                if last is not None:
                    if not response_complete:
                        disconnected = True
                        handler.cancel()
                    return
                while message.get("more_body", False) and inbox:  # backpressure: one chunk at a time
                    taken.clear()
                    await taken.wait()

        watcher = asyncio.ensure_future(watch())
        try:
            # asyncio.wait, not `await handler`: if *this* task is cancelled (server
            # shutdown), we cancel the handler ourselves and re-raise below.
            await asyncio.wait({handler})
        except asyncio.CancelledError:
            handler.cancel()
            raise
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if handler.cancelled() and disconnected:
            return  # the client is gone: there is nobody to answer
        handler.result()  # re-raise the handler's exception, if any
