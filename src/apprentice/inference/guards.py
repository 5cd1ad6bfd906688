"""What keeps one hostile or careless client from hurting the others: the API key, a cap on request bodies and
on the time taken to send one, and cancelling generation when the client goes away.

The key check and the body limits are plain ASGI middlewares (not Starlette's BaseHTTPMiddleware, which runs the
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
    as soon as the running total passes the cap (chunked bodies), so a huge body is never held in memory.

    And bodies not received in full within `timeout_s` of the request's headers with 408 (a client trickling
    its body byte by byte would otherwise hold its connection and handler forever: uvicorn has no body
    timeout). The deadline covers the body only: the wait for a disconnect during generation is not bounded."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def counted() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:  # raised inside the endpoint's body read: its handler answers 408
                raise _too_slow(received, self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:  # raised inside the endpoint's body read: its handler answers 413
                    raise _too_large(received, self.max_bytes)
            else:
                body_done = True
            return message

        await self.app(scope, counted, send)


def _too_slow(received: int, timeout_s: float) -> RequestError:
    return RequestError(408, f"request body not received in time: {received} bytes in {timeout_s:g} s, the server's "
                             f"limit for a whole body (apprentice serve --body-timeout-s)", code="request_timeout")  # fmt: skip


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
