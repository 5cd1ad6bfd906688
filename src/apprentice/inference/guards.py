"""What keeps one hostile or careless client from hurting the others: the API key, a cap on request bodies, and
cancelling generation when the client goes away.

The key check is a plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which runs the endpoint in
another task and gets in the way of seeing a client disconnect).
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import Future
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

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


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `max_bytes` (from Content-Length
    before reading anything, or while reading a chunked body), so a huge body is never held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


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
