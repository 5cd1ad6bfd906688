"""One endpoint's request machinery, shared by the chat client and the scoring client (composition, not inheritance).

`EndpointSession` owns what every request to an OpenAI-compatible endpoint needs, whatever it asks:
  - at most `max_concurrency` requests in flight, request starts spaced by `endpoint.max_requests_per_s`;
  - each attempt has a total deadline of `endpoint.timeout_s` and reads at most a byte cap (clients/http.py);
  - retries with exponential backoff and full jitter on 429 (Retry-After honoured up to
    `endpoint.max_retry_after_s`), 5xx, timeouts, dropped connections and bodies that are not JSON;
  - no retry for other 4xx (`ClientError`), nor a 5xx saying the request cannot be parsed;
  - 401/403 or an unset API-key variable: `TeacherAuthError` (the run stops, naming the variable);
  - counters (`<prefix>requests`, `retries`, `retries/<kind>`, `retry_wait_s`, `malformed`) and latencies;
  - the usage of every answer returned, usable or not, summed per request (`request_paid`) and, with a `budget`
    (clients/base.py), charged to it; no attempt once that is spent.

What a request asks and how its answer is read are the caller's: `request(body, read)` posts `body` and hands
the decoded JSON to `read(raw, data)`, which returns the result or raises `Retryable` (worth another attempt)
or `SetAside` (answered and paid, but unusable: not retried).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from apprentice.clients.base import Budget, ClientError, TeacherAuthError, Usage
from apprentice.clients.http import BodyTooLarge, RawResponse, post
from apprentice.clients.parse import Unusable, decode_body
from apprentice.clients.ratelimit import RateLimiter, backoff_delay, parse_retry_after
from apprentice.config import EndpointConfig

log = logging.getLogger("apprentice.teacher")

T = TypeVar("T")

# HTTP status -> ClientError kind for failures that are not retried (401/403 stop the run instead).
_STATUS_KINDS = {400: "bad_request", 404: "not_found", 413: "bad_request", 422: "bad_request"}
# A 5xx whose message says the request itself is unparseable is deterministic: the same bytes fail again.
_UNPARSEABLE_REQUEST = re.compile(r"(?i)failed to parse|could not parse|cannot parse|invalid json|parse error")
# Waiting this long before a retry is logged: a silent multi-minute pause looks like a hang.
_LONG_WAIT_S = 5.0


class Retryable(Exception):
    """An attempt that failed in a way worth retrying."""

    def __init__(self, kind: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after_s = retry_after_s


class SetAside(Exception):
    """The endpoint answered (and was paid) but the answer is unusable: not retried; the caller decides the rest."""

    def __init__(self, kind: str, message: str, usage: Usage) -> None:
        super().__init__(message)
        self.kind = kind
        self.usage = usage


Reader = Callable[[RawResponse, Any], T]
"""read(raw response, decoded JSON body) -> result; may raise Retryable, SetAside or ClientError."""


class EndpointSession:
    """HTTP client, limits, retry policy and counters of one endpoint URL (see the module docstring)."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        url: str,
        *,
        max_concurrency: int,
        max_response_bytes: int,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        jitter_seed: int | None = None,
        prefix: str = "teacher/",
        section: str = "orchestrator.rollout_model",
        budget: Budget | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.budget = budget
        self.url = url
        self.max_response_bytes = max_response_bytes
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.prefix = prefix
        self.section = section
        """The config section of this endpoint, named in error messages."""
        self.counters: defaultdict[str, float] = defaultdict(float)
        self.latencies_s: list[float] = []
        self._rng = random.Random(jitter_seed)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._limiter = RateLimiter(endpoint.max_requests_per_s)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(endpoint.timeout_s),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            headers={"User-Agent": "apprentice", **endpoint.headers},
            follow_redirects=False,
        )

    def count(self, name: str, value: float = 1.0) -> None:
        self.counters[self.prefix + name] += value

    def reset(self) -> None:
        self.counters.clear()
        self.latencies_s.clear()

    def latency_metrics(self) -> dict[str, float]:
        if not self.latencies_s:
            return {}
        return {f"{self.prefix}latency_s": sum(self.latencies_s) / len(self.latencies_s),
                f"{self.prefix}latency_s_max": max(self.latencies_s)}  # fmt: skip

    def metrics(self, reset: bool = False, *, always: tuple[str, ...] = ("requests", "retries", "cache_hits")) -> dict[str, float]:
        """Counters since construction (or the last `reset=True` call) and latencies, under the session's prefix;
        the `always` counters appear as 0.0 when nothing was counted."""
        out = dict(self.counters)
        for name in always:
            out.setdefault(self.prefix + name, 0.0)
        out.update(self.latency_metrics())
        if reset:
            self.reset()
        return out

    async def aclose(self) -> None:
        await self._http.aclose()

    def api_key(self) -> str | None:
        return read_api_key(self.endpoint, self.section)

    async def request(self, body: dict[str, Any], read: Reader[T], *, max_bytes: int | None = None) -> T:
        """POST `body` under the retry policy; `read`'s result. Raises ClientError / TeacherAuthError / SetAside."""
        return (await self.request_paid(body, read, max_bytes=max_bytes))[0]

    async def request_paid(self, body: dict[str, Any], read: Reader[T], *,
                           max_bytes: int | None = None) -> tuple[T, Usage]:  # fmt: skip
        """`request`, and the usage of every answer the endpoint returned for it: an attempt retried as malformed was
        billed too. A failure after an answer carries that sum (`SetAside.usage`; `ClientError.usage` where it
        has none)."""
        paid = [Usage()]
        try:
            return await self._with_retries(body, read, paid, max_bytes), paid[0]
        except SetAside as aside:
            raise SetAside(aside.kind, str(aside), paid[0]) from None
        except ClientError as e:  # a bad logprob, a malformed answer retried to the end: paid all the same
            if e.usage is None and paid[0] != Usage():
                e.usage = paid[0]
            raise

    async def _with_retries(self, body: dict[str, Any], read: Reader[T], paid: list[Usage],
                            max_bytes: int | None) -> T:  # fmt: skip
        api_key = self.api_key()
        headers = {"Content-Type": "application/json"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        try:
            payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ClientError("invalid_text", "the conversation holds a lone surrogate (not text): it cannot be sent") from None
        max_retries = self.endpoint.max_retries
        for attempt in range(max_retries + 1):
            try:
                async with self._semaphore:
                    await self._limiter.acquire()
                    if self.budget is not None:  # checked at the last moment: requests queued here see the cap
                        self.budget.check()
                    return await self._attempt(payload, headers, api_key, read, max_bytes or self.max_response_bytes,
                                               paid)  # fmt: skip
            except Retryable as failure:
                if attempt == max_retries:
                    raise ClientError(
                        failure.kind, f"{failure} (gave up after {max_retries + 1} attempts to {self.endpoint.base_url})"
                    ) from None
                delay = self._retry_delay(attempt, failure)
                self.count("retries")
                self.count(f"retries/{failure.kind}")
                self.count("retry_wait_s", delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def scoring_request(self, body: dict[str, Any], read: Reader[tuple[T, dict[str, Any]]], *,
                              max_bytes: int | None = None) -> T:  # fmt: skip
        """`request` for a scoring call whose reader returns (result, the answer's usage), counted: `errors/<kind>`
        on failure (an oversized or non-UTF-8 answer, set aside by `request`, becomes a ClientError of its kind:
        nothing worth caching), `responses` and `prompt_tokens` on success."""
        try:
            result, usage = await self.request(body, read, max_bytes=max_bytes)
        except SetAside as e:
            self.count(f"errors/{e.kind}")
            raise ClientError(e.kind, str(e)) from None
        except ClientError as e:
            self.count(f"errors/{e.kind}")
            raise
        except TeacherAuthError:
            self.count("errors/auth")
            raise
        self.count("prompt_tokens", float(Usage.from_json(usage).prompt_tokens))
        self.count("responses")
        return result

    def _retry_delay(self, attempt: int, failure: Retryable) -> float:
        delay = backoff_delay(attempt, base_s=self.backoff_base_s, max_s=self.backoff_max_s, rng=self._rng)
        if failure.retry_after_s is not None:
            cap = self.endpoint.max_retry_after_s
            if failure.retry_after_s > cap:
                raise ClientError(
                    failure.kind,
                    f"{self.endpoint.base_url} asked to wait {failure.retry_after_s:.0f} s before retrying ({failure}; "
                    f"Retry-After), more than {self.section}.max_retry_after_s = {cap:g}: gave this request "
                    "up. Raise max_retry_after_s to wait that long, or lower max_requests_per_s / max_concurrency",
                )
            delay = max(delay, failure.retry_after_s)
        if delay >= _LONG_WAIT_S:
            log.warning("teacher %s: %s; waiting %.0f s before retry %d of %d",
                        self.endpoint.base_url, failure, delay, attempt + 1, self.endpoint.max_retries)  # fmt: skip
        return delay

    async def _attempt(self, payload: bytes, headers: dict[str, str], api_key: str | None, read: Reader[T],
                       max_bytes: int, paid: list[Usage]) -> T:  # fmt: skip
        self.count("requests")
        start = time.monotonic()
        timeout_s = self.endpoint.timeout_s
        try:
            raw = await post(self._http, self.url, payload, headers, deadline_s=timeout_s, max_bytes=max_bytes)
        except BodyTooLarge as e:
            raise SetAside("oversized", f"{e} (endpoint.max_response_bytes): set aside, never rendered", Usage()) from None
        except (TimeoutError, httpx.TimeoutException):
            raise Retryable("timeout", f"no complete answer within timeout_s={timeout_s:g} (a total deadline per request)") from None
        except httpx.TransportError as e:
            raise Retryable("connection", f"connection failed: {type(e).__name__}: {e}") from None
        if not 200 <= raw.status < 300:
            self._raise_for_status(raw, api_key)
        try:
            data = decode_body(raw.body)
        except Unusable as e:
            raise SetAside(e.kind, str(e), Usage()) from None
        except ValueError:
            self.count("malformed")
            raise Retryable("malformed", f"response body is not JSON: {raw.body[:200]!r}") from None
        self.latencies_s.append(time.monotonic() - start)
        # Billed before it is read: usable or not.
        usage = Usage.from_json(data.get("usage")) if isinstance(data, dict) else Usage()
        paid[0] = paid[0] + usage
        if self.budget is not None:
            self.budget.add(usage)
        return read(raw, data)

    def _raise_for_status(self, raw: RawResponse, api_key: str | None) -> None:
        status = raw.status
        message = server_message(raw.body, api_key)
        if status in (401, 403):
            var = self.endpoint.api_key_var
            fix = (f"check the key in the environment variable {var!r} ({self.section}.api_key_var)"
                   if var else f"set {self.section}.api_key_var to the name of the variable holding the key")  # fmt: skip
            raise TeacherAuthError(f"{self.endpoint.base_url} refused the credentials (HTTP {status}: {message}): {fix}")
        if status == 429:
            raise Retryable("rate_limit", f"HTTP 429: {message}", parse_retry_after(raw.headers.get("retry-after")))
        if status >= 500 and _UNPARSEABLE_REQUEST.search(message):
            raise ClientError("unparseable_request", f"{self.endpoint.base_url} cannot parse the request (HTTP {status}: "
                                                     f"{message}); not retried, the same request would fail again")  # fmt: skip
        if status >= 500:
            raise Retryable("server", f"HTTP {status}: {message}")
        raise ClientError(_STATUS_KINDS.get(status, "client_error"), f"{self.endpoint.base_url} answered HTTP {status}: {message}")


def read_api_key(endpoint: EndpointConfig, section: str) -> str | None:
    """The endpoint's API key from its `api_key_var` (read at call time, never stored); None without one;
    TeacherAuthError naming the variable when it is not set."""
    var = endpoint.api_key_var
    if var is None:
        return None  # no key configured: send no Authorization header at all
    key = os.environ.get(var)
    if not key:
        raise TeacherAuthError(
            f"the API key of {endpoint.base_url} is read from the environment variable {var!r} "
            f"({section}.api_key_var), which is not set: export {var}=... and rerun"
        )
    return key


def endpoint_headers(endpoint: EndpointConfig, section: str) -> dict[str, str]:
    """The headers every request to `endpoint` carries: its configured `headers` and its API key, for clients
    other than a session's (weight reloads and updates to the student's server)."""
    key = read_api_key(endpoint, section)
    return {**endpoint.headers, **({"Authorization": f"Bearer {key}"} if key is not None else {})}


def server_message(body: bytes, api_key: str | None) -> str:
    """The error message of an OpenAI-style error body (or the body's text), never echoing our API key."""
    text = body.decode("utf-8", errors="replace")
    message = text
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and error.get("message"):
            message = str(error["message"])
        elif isinstance(error, str):
            message = error
    if api_key:
        message = message.replace(api_key, "[API key]")
    message = message.strip()
    return message[:500] + ("..." if len(message) > 500 else "")
