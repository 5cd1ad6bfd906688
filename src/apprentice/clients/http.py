"""One HTTP POST with a total deadline and a cap on what is read: a hostile server can neither stall nor flood us.

httpx's own timeout applies per read, so a server that sends its headers and then one byte every few seconds
never trips it; the deadline here covers the whole exchange (connect, send, headers, body). The body is read
in chunks and reading stops as soon as it passes `max_bytes` (a declared Content-Length over the cap stops it
before the first byte), so an answer of 50 MB costs at most the cap in memory, not the whole answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

ERROR_BODY_BYTES = 64 * 1024
"""Error bodies (4xx/5xx) are read up to this size: enough for any message, not for a flood."""


class BodyTooLarge(Exception):
    """The body passed the cap; `seen` bytes were read (or declared by Content-Length)."""

    def __init__(self, seen: int, limit: int, *, declared: bool = False) -> None:
        how = f"its Content-Length is {seen}: not read" if declared else f"stopped reading after {seen}"
        super().__init__(f"the response body is larger than {limit} bytes ({how})")
        self.seen = seen
        self.limit = limit


@dataclass
class RawResponse:
    status: int
    headers: httpx.Headers
    body: bytes
    """The whole body for a 2xx; at most ERROR_BODY_BYTES of it otherwise."""


async def post(
    client: httpx.AsyncClient, url: str, payload: bytes, headers: dict[str, str], *, deadline_s: float, max_bytes: int
) -> RawResponse:
    """POST `payload`; `TimeoutError` past `deadline_s` in total, `BodyTooLarge` past `max_bytes` (2xx only),
    `httpx.TransportError` for connection failures."""
    async with asyncio.timeout(deadline_s):
        async with client.stream("POST", url, content=payload, headers=headers) as response:
            ok = 200 <= response.status_code < 300
            limit = max_bytes if ok else ERROR_BODY_BYTES
            declared = response.headers.get("content-length", "")
            if ok and declared.isdigit() and int(declared) > limit:
                raise BodyTooLarge(int(declared), limit, declared=True)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    if ok:
                        raise BodyTooLarge(size, limit)
                    chunks.append(chunk[: len(chunk) - (size - limit)])
                    break
                chunks.append(chunk)
            return RawResponse(response.status_code, response.headers, b"".join(chunks))
