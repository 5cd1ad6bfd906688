"""What keeps one hostile or careless client from hurting the others: the API key, a cap on request bodies, and
cancelling generation when the client goes away.

The key check and the body cap are plain ASGI middlewares (not Starlette's BaseHTTPMiddleware, which runs the
endpoint in another task and gets in the way of seeing a client disconnect), so they cover every endpoint.
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import Future
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apprentice.inference.schema import error_body

T = TypeVar("T")


class RequestError(Exception):
    """A request we refuse with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class RequireKey:
    """Every path but /health needs `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                body = error_body("Invalid or missing API key (Authorization: Bearer ...).", "authentication_error",
                                  code="invalid_api_key")  # fmt: skip
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class LimitBody:
    """Refuse request bodies over `max_bytes` with 413, before reading them when Content-Length says so, else
    as soon as the running total passes the cap (chunked bodies), so a huge body is never held in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            error = _too_large(int(declared), self.max_bytes)
            await JSONResponse(error_body(str(error), code=error.code), status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # raised inside the endpoint's body read: its handler answers 413
                    raise _too_large(received, self.max_bytes)
            return message

        await self.app(scope, counted, send)


def _too_large(size: int, max_bytes: int) -> RequestError:
    return RequestError(413, f"request body too large: {size} bytes or more, the server's limit is {max_bytes} "
                             f"bytes (apprentice serve --max-body-mb)", code="request_too_large")  # fmt: skip


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (call after the body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def result_unless_disconnected(request: Request, future: Future[T]) -> T | None:
    """The engine's result, or None after cancelling the generation if the client disconnects first."""
    result: asyncio.Future[T] = asyncio.wrap_future(future)
    watcher: asyncio.Future[None] = asyncio.ensure_future(until_disconnected(request))
    waiting: set[asyncio.Future[Any]] = {result, watcher}
    try:
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if result in done:
        return result.result()
    future.cancel()  # the engine drops the request at its next token
    result.cancel()
    return None


def disconnect_response() -> Any:
    """What a handler returns when nobody is listening any more (499, as nginx logs it)."""
    return JSONResponse(error_body("client disconnected", "client_closed_request"), status_code=499)
