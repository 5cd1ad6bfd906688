"""The teacher client: the official `openai` async client with our own retry policy, rate limit and cache.

Policy (one place, counted in `metrics()`):
  - at most `max_concurrency` requests in flight, request starts spaced by `endpoint.max_requests_per_s`;
  - retried up to `endpoint.max_retries` times with exponential backoff and full jitter: 429 (waiting at least
    the server's Retry-After), 5xx, timeouts, dropped connections and malformed response bodies;
  - never retried: other 4xx (the server's message is raised as `ClientError`), a missing API-key variable,
    and an empty teacher answer (`ClientError("empty")`: a teacher that answers nothing usually does so again,
    retrying would pay twice); with the token client an empty answer is a valid rollout and is returned;
  - a turn cut off by max_tokens is returned with finish_reason "length" and counted (`teacher/truncated`):
    the orchestrator applies the user's truncation policy.
The openai client's own retries are disabled so that every attempt is ours and counted.

Request bodies hold only fields a hosted OpenAI-compatible API accepts (model, messages, tools, temperature,
top_p, max_tokens, stop, seed) plus `sampling.extra_body`; `logprobs` and `return_token_ids` are added only
with `use_token_client` (apprentice serve and vLLM understand them; hosted APIs reject the latter).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import openai

from apprentice.clients.base import ChatResponse, ClientError
from apprentice.clients.cache import ResponseCache
from apprentice.clients.ratelimit import RateLimiter, backoff_delay, parse_retry_after
from apprentice.config import EndpointConfig, SamplingConfig

# Request fields the openai SDK takes as keyword arguments; anything else travels in `extra_body`.
_SDK_FIELDS = frozenset({"model", "messages", "tools", "temperature", "top_p", "max_tokens", "stop", "seed", "n",
                         "logprobs", "top_logprobs"})  # fmt: skip
# HTTP status -> ClientError kind for failures that are not retried.
_STATUS_KINDS = {400: "bad_request", 401: "auth", 403: "auth", 404: "not_found", 413: "bad_request",
                 422: "bad_request"}  # fmt: skip
# The SDK requires some credential at construction; the real one is set per request (or omitted) below.
_PLACEHOLDER_KEY = "set-per-request"


class TokenFieldsMissing(ValueError):
    """The token client asked for token ids / logprobs and the server did not return them (not worth a retry)."""


class _Retryable(Exception):
    """An attempt that failed in a way worth retrying."""

    def __init__(self, kind: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after_s = retry_after_s


# Message fields of the chat-completions schema. Trajectories carry more (the teacher's `reasoning_content` of
# earlier turns, kept for training); strict hosted APIs reject such fields in requests, so they stay home.
WIRE_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})


def wire_message(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with only the fields a hosted OpenAI-compatible API accepts."""
    return {k: v for k, v in message.items() if k in WIRE_MESSAGE_FIELDS}


class OpenAIChatClient:
    """`ChatClient` over any OpenAI-compatible chat endpoint (hosted API, vLLM, `apprentice serve`).

    One instance per endpoint and event loop. `cache_dir` (OUTPUT/teacher_cache in distill mode) enables the
    response cache: a (request, key) pair seen before is answered from disk without a request.
    """

    def __init__(
        self,
        endpoint: EndpointConfig,
        sampling: SamplingConfig,
        *,
        max_concurrency: int,
        use_token_client: bool,
        cache_dir: Path | None,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        jitter_seed: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.sampling = sampling
        self.use_token_client = use_token_client
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self._rng = random.Random(jitter_seed)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._limiter = RateLimiter(endpoint.max_requests_per_s)
        self._cache = ResponseCache(cache_dir) if cache_dir is not None else None
        self._openai = openai.AsyncOpenAI(
            api_key=_PLACEHOLDER_KEY,
            base_url=endpoint.base_url,
            timeout=endpoint.timeout_s,
            max_retries=0,
            default_headers=dict(endpoint.headers),
        )
        self._counters: dict[str, float] = defaultdict(float)
        self._latencies_s: list[float] = []

    # ---- public API ----

    def build_request(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, key: str = ""
    ) -> dict[str, Any]:
        """The exact JSON body sent for one turn (also the cache key's request part).

        With `sampling.seed` set, the seed sent is derived from (seed, key): reproducible per rollout, yet the
        samples of one prompt (different keys) differ instead of being copies of each other.
        """
        s = self.sampling
        if not self.use_token_client:
            messages = [wire_message(m) for m in messages]
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": messages}
        if tools:
            body["tools"] = tools
        body.update(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
        if s.stop is not None:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed if not key else zlib.crc32(f"{s.seed}:{key}".encode()) & 0x7FFFFFFF
        body.update(s.extra_body)
        if self.use_token_client:
            body.update(logprobs=True, return_token_ids=True)
        return body

    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse:
        body = self.build_request(messages, tools, key)
        if self._cache is not None:
            stored = self._cache.get(body, key)
            if stored is not None:
                self._counters["teacher/cache_hits"] += 1
                return self._deliver(_response_from_dict(stored, cached=True))
        try:
            data = await self._request_with_retries(body)
        except ClientError as e:
            self._counters[f"teacher/errors/{e.kind}"] += 1
            raise
        response, usage = data
        for name in ("prompt_tokens", "completion_tokens"):
            self._counters[f"teacher/{name}"] += float(usage.get(name) or 0)
        if self._cache is not None:
            self._cache.put(body, key, _response_to_dict(response))
        return self._deliver(response)

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters since construction (or the last `reset=True` call), all under `teacher/`."""
        out = dict(self._counters)
        for name in ("teacher/requests", "teacher/retries", "teacher/cache_hits", "teacher/truncated",
                     "teacher/empty"):  # fmt: skip
            out.setdefault(name, 0.0)
        if self._latencies_s:
            out["teacher/latency_s"] = sum(self._latencies_s) / len(self._latencies_s)
            out["teacher/latency_s_max"] = max(self._latencies_s)
        if reset:
            self._counters.clear()
            self._latencies_s.clear()
        return out

    async def aclose(self) -> None:
        await self._openai.close()

    # ---- internals ----

    def _deliver(self, response: ChatResponse) -> ChatResponse:
        self._counters["teacher/responses"] += 1
        if response.finish_reason == "length":
            self._counters["teacher/truncated"] += 1
        return response

    def _auth_headers(self) -> dict[str, Any]:
        var = self.endpoint.api_key_var
        if var is None:
            return {"Authorization": openai.Omit()}  # no key configured: send no Authorization header at all
        key = os.environ.get(var)
        if not key:
            raise ClientError(
                "auth",
                f"the teacher's API key is read from the environment variable {var!r} "
                f"(orchestrator.rollout_model.api_key_var), which is not set: export {var}=... and rerun",
            )
        return {"Authorization": f"Bearer {key}"}

    async def _request_with_retries(self, body: dict[str, Any]) -> tuple[ChatResponse, dict[str, Any]]:
        headers = self._auth_headers()
        max_retries = self.endpoint.max_retries
        for attempt in range(max_retries + 1):
            try:
                async with self._semaphore:
                    await self._limiter.acquire()
                    return await self._attempt(body, headers)
            except _Retryable as failure:
                if attempt == max_retries:
                    raise ClientError(
                        failure.kind, f"{failure} (gave up after {max_retries + 1} attempts to {self.endpoint.base_url})"
                    ) from failure
                self._counters["teacher/retries"] += 1
                self._counters[f"teacher/retries/{failure.kind}"] += 1
                delay = backoff_delay(attempt, base_s=self.backoff_base_s, max_s=self.backoff_max_s, rng=self._rng)
                if failure.retry_after_s is not None:
                    delay = max(delay, min(failure.retry_after_s, self.max_retry_after_s))
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(self, body: dict[str, Any], headers: dict[str, Any]) -> tuple[ChatResponse, dict[str, Any]]:
        kwargs = {k: v for k, v in body.items() if k in _SDK_FIELDS}
        extra = {k: v for k, v in body.items() if k not in _SDK_FIELDS}
        self._counters["teacher/requests"] += 1
        start = time.monotonic()
        try:
            raw = await self._send(kwargs, extra, headers)
        except openai.APIStatusError as e:
            status = e.status_code
            message = _server_message(e)
            if status == 429:
                raise _Retryable("rate_limit", f"HTTP 429: {message}", parse_retry_after(e.response.headers.get("retry-after"))) from e
            if status >= 500:
                raise _Retryable("server", f"HTTP {status}: {message}") from e
            raise ClientError(
                _STATUS_KINDS.get(status, "client_error"), f"{self.endpoint.base_url} answered HTTP {status}: {message}"
            ) from e
        except openai.APITimeoutError as e:  # before APIConnectionError: it is a subclass
            raise _Retryable("timeout", f"no answer within timeout_s={self.endpoint.timeout_s}") from e
        except openai.APIConnectionError as e:
            raise _Retryable("connection", f"connection failed: {e.__cause__ or e}") from e
        try:
            data = json.loads(raw.text)
        except ValueError as e:
            self._counters["teacher/malformed"] += 1
            raise _Retryable("malformed", f"response body is not JSON: {raw.text[:200]!r}") from e
        self._latencies_s.append(time.monotonic() - start)
        return self._parse(data)

    async def _send(self, kwargs: dict[str, Any], extra: dict[str, Any], headers: dict[str, Any]) -> Any:
        """One raw HTTP request of this client's API (chat completions); clients of other APIs override it
        (clients/scoring.py: the completions API) and share the retry policy around it."""
        return await self._openai.chat.completions.with_raw_response.create(
            **kwargs, extra_body=extra or None, extra_headers=headers
        )

    def _parse(self, data: Any) -> tuple[ChatResponse, dict[str, Any]]:
        try:
            response = parse_completion(data, use_token_client=self.use_token_client)
        except TokenFieldsMissing as e:
            self._counters["teacher/malformed"] += 1
            raise ClientError("malformed", str(e)) from e
        except ValueError as e:
            self._counters["teacher/malformed"] += 1
            raise _Retryable("malformed", f"malformed response: {e}") from e
        usage = data.get("usage") or {}
        if _is_empty(response) and response.finish_reason != "length":
            self._counters["teacher/empty"] += 1
            # A student (token client, rl mode) that says nothing is a rollout to learn from; a teacher is not.
            if self.use_token_client:
                return response, usage if isinstance(usage, dict) else {}
            raise ClientError("empty", f"the teacher returned an empty answer (finish_reason={response.finish_reason!r})")
        return response, usage if isinstance(usage, dict) else {}


def _server_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(e.message)


def _is_empty(response: ChatResponse) -> bool:
    content = response.message.get("content")
    return not (content and content.strip()) and not response.message.get("tool_calls")


def _text(content: Any) -> str | None:
    """Message content as a string: None, a string, or a list of content parts (text parts joined)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError(f"message.content has unexpected type {type(content).__name__}")


def _tool_call(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ValueError(f"tool call without a function object: {call!r}")
    fn = call["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"tool call without a name: {call!r}")
    arguments = fn.get("arguments")
    # Some servers send arguments as an object; the chat format (and our renderer) expects a JSON string.
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": str(call.get("id") or ""), "type": "function", "function": {"name": fn["name"], "arguments": arguments}}


def parse_completion(data: Any, *, use_token_client: bool) -> ChatResponse:
    """First choice of a chat-completions JSON body as a normalised `ChatResponse`; ValueError if malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no 'choices' array")
    choice = data["choices"][0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise ValueError("choices[0] has no 'message' object")
    raw = choice["message"]
    message: dict[str, Any] = {"role": "assistant", "content": _text(raw.get("content"))}
    if raw.get("tool_calls"):
        if not isinstance(raw["tool_calls"], list):
            raise ValueError("message.tool_calls is not an array")
        message["tool_calls"] = [_tool_call(c) for c in raw["tool_calls"]]
    # vLLM calls it `reasoning_content` (older) or `reasoning` (newer); keep it under the one name we use.
    reasoning = raw.get("reasoning_content") or raw.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        message["reasoning_content"] = reasoning
    response = ChatResponse(message=message, finish_reason=str(choice.get("finish_reason") or "unknown"))
    if use_token_client:
        prompt_ids = data.get("prompt_token_ids", choice.get("prompt_token_ids"))
        completion_ids = choice.get("token_ids")
        content_lps = (choice.get("logprobs") or {}).get("content")
        if not isinstance(prompt_ids, list) or not isinstance(completion_ids, list) or not isinstance(content_lps, list):
            raise TokenFieldsMissing(
                "use_token_client needs prompt_token_ids, choices[].token_ids and logprobs in the response; "
                "serve the model with `apprentice serve` or vLLM >= 0.10.2"
            )
        if len(content_lps) != len(completion_ids):
            raise ValueError(f"{len(completion_ids)} token ids but {len(content_lps)} logprobs")
        response.prompt_ids = [int(t) for t in prompt_ids]
        response.completion_ids = [int(t) for t in completion_ids]
        response.completion_logprobs = [float(lp["logprob"]) for lp in content_lps]
    return response


def _response_to_dict(r: ChatResponse) -> dict[str, Any]:
    return {"message": r.message, "finish_reason": r.finish_reason, "prompt_ids": r.prompt_ids,
            "completion_ids": r.completion_ids, "completion_logprobs": r.completion_logprobs}  # fmt: skip


def _response_from_dict(d: dict[str, Any], *, cached: bool) -> ChatResponse:
    return ChatResponse(
        message=d["message"],
        finish_reason=d["finish_reason"],
        prompt_ids=d.get("prompt_ids"),
        completion_ids=d.get("completion_ids"),
        completion_logprobs=d.get("completion_logprobs"),
        cached=cached,
    )
