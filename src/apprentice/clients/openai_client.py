"""The teacher client: OpenAI-compatible chat completions over httpx, with our own retry policy, limits and cache.

Policy (one place, counted in `metrics()`):
  - at most `max_concurrency` requests in flight, request starts spaced by `endpoint.max_requests_per_s`;
  - each attempt has a total deadline of `endpoint.timeout_s` (not per read) and reads at most
    `endpoint.max_response_bytes` (clients/http.py);
  - retried up to `endpoint.max_retries` times with exponential backoff and full jitter: 429 (waiting the server's
    Retry-After, up to `endpoint.max_retry_after_s`; a longer one gives the request up), 5xx, timeouts, dropped
    connections and bodies that are not JSON;
  - never retried: other 4xx (`ClientError` with the server's message), a 5xx saying the request itself cannot be
    parsed (llama.cpp's "Failed to parse tool call arguments as JSON": retrying sends the same bytes again);
  - 401/403 or an unset API-key variable: `TeacherAuthError` (an `ApprenticeError`): the run stops with a message
    naming the variable, because every further request would fail the same way;
  - answers the teacher did send but that must not be trained on are set aside as `ClientError(kind)`, with the
    usage they cost, and cached so a resumed run does not pay for them again: `empty` (nothing but perhaps
    reasoning; the token client returns it, a student's silence is a rollout), `invalid_text` (not UTF-8, lone
    surrogates), `oversized` (over the byte cap, or past max_tokens by its usage or length);
  - a turn cut off by max_tokens is returned with finish_reason "length" and counted (`teacher/truncated`):
    the orchestrator applies the user's truncation policy.

Request bodies hold only fields a hosted OpenAI-compatible API accepts (model, messages, tools, the sampling
fields that are set, the token-limit field named by `sampling.max_tokens_field`, stop, seed), the optional
`prompt_cache_key` / `user` tags, plus `sampling.extra_body`; `logprobs` and `return_token_ids` are added only
with `use_token_client` (apprentice serve and vLLM understand them; hosted APIs reject the latter), and
`logprobs` + `top_logprobs` only when `sampling.top_logprobs` asks for the teacher's top-k (off-policy soft
targets: every OpenAI-compatible chat API defines both; the answer's per-token logprobs, checked as
clients/logprobs.py says, are on `ChatResponse.token_logprobs`). The HTTP, limits and retry machinery is
`EndpointSession` (clients/session.py), shared with the scoring client.

Usage: every paid request's `Usage` is on its `ChatResponse.usage` (or `ClientError.usage` when set aside),
summed in the `teacher/prompt_tokens`, `teacher/completion_tokens`, `teacher/reasoning_tokens` and
`teacher/cached_prompt_tokens` counters, and passed to `on_usage(key, usage)` when given. Cache hits cost
nothing: they are not counted, and a cached set-aside verdict raises `ClientError` with `usage=None`. (The
orchestrator charges usage per step from these as `teacher/usage/*`: orchestrator/metered.py.)
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apprentice.clients.base import ChatResponse, ClientError, TeacherAuthError, Usage
from apprentice.clients.cache import ResponseCache
from apprentice.clients.http import RawResponse
from apprentice.clients.logprobs import BadLogprob
from apprentice.clients.parse import (
    TokenFieldsMissing,
    Unusable,
    check_size,
    check_text,
    is_empty,
    parse_completion,
)
from apprentice.clients.session import EndpointSession
from apprentice.clients.session import Retryable as _Retryable
from apprentice.clients.session import SetAside as _SetAside
from apprentice.clients.wire import prompt_cache_key, wire_message
from apprentice.config import EndpointConfig, SamplingConfig

__all__ = ["OpenAIChatClient", "TokenFieldsMissing", "parse_completion", "wire_message"]

log = logging.getLogger("apprentice.teacher")

# Request fields that tag a request for the provider; they are not part of what is asked, so not of the cache key.
_TAG_FIELDS = ("prompt_cache_key", "user")
_BASE_RESPONSE_BYTES = 4 * 1024 * 1024
_RESPONSE_BYTES_PER_TOKEN = 1024
_TOP_LOGPROB_BYTES = 160
"""Per generated token and top_logprobs entry: `{"token": ..., "logprob": ..., "bytes": [...]}` in JSON."""

UsageListener = Callable[[str, Usage], None]


class OpenAIChatClient:
    """`ChatClient` over any OpenAI-compatible chat endpoint (hosted API, vLLM, llama.cpp, `apprentice serve`).

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
        jitter_seed: int | None = None,
        on_usage: UsageListener | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.sampling = sampling
        self.use_token_client = use_token_client
        self.on_usage = on_usage
        per_token = _RESPONSE_BYTES_PER_TOKEN + _TOP_LOGPROB_BYTES * (sampling.top_logprobs + 1) * (sampling.top_logprobs > 0)
        max_response_bytes = endpoint.max_response_bytes or (_BASE_RESPONSE_BYTES + per_token * sampling.max_tokens)
        # The HTTP/retry/limit machinery, shared with the scoring client (clients/session.py); counters live there.
        self._session = EndpointSession(
            endpoint, f"{endpoint.base_url}/chat/completions", max_concurrency=max_concurrency,
            max_response_bytes=max_response_bytes, backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
            jitter_seed=jitter_seed,
        )  # fmt: skip
        self._cache = ResponseCache(cache_dir) if cache_dir is not None else None
        self._counters = self._session.counters
        self._warned_server = False

    @property
    def max_response_bytes(self) -> int:
        """Largest answer read (endpoint.max_response_bytes, or 4 MiB plus a per-token allowance)."""
        return self._session.max_response_bytes

    @max_response_bytes.setter
    def max_response_bytes(self, value: int) -> None:
        self._session.max_response_bytes = value

    # ---- public API ----

    def build_request(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, key: str = ""
    ) -> dict[str, Any]:
        """The exact JSON body sent for one turn (less the tag fields, also the cache key's request part).

        With `sampling.seed` set, the seed sent is derived from (seed, key): reproducible per rollout, yet the
        samples of one prompt (different keys) differ instead of being copies of each other.
        """
        s = self.sampling
        wire = messages if self.use_token_client else [wire_message(m) for m in messages]
        body: dict[str, Any] = {"model": self.endpoint.model, "messages": wire}
        if tools:
            body["tools"] = tools
        # Unset means "not sent" (the server's default, the only value some reasoning APIs accept); the token
        # client always sends both: rl-mode importance ratios assume untempered sampling.
        for name, value in (("temperature", s.temperature), ("top_p", s.top_p)):
            if value is not None or self.use_token_client:
                body[name] = 1.0 if value is None else value
        body[s.max_tokens_field] = s.max_tokens
        if s.stop is not None:
            body["stop"] = list(s.stop)
        if s.seed is not None:
            body["seed"] = s.seed if not key else zlib.crc32(f"{s.seed}:{key}".encode()) & 0x7FFFFFFF
        body.update(s.extra_body)
        if self.use_token_client:
            body.update(logprobs=True, return_token_ids=True)
        elif s.top_logprobs:  # off-policy soft targets; never sent unless asked (a strict API may reject them)
            body.update(logprobs=True, top_logprobs=s.top_logprobs)
        if self.endpoint.prompt_cache_key:
            body["prompt_cache_key"] = prompt_cache_key(messages)
        if self.endpoint.user is not None:
            body["user"] = self.endpoint.user
        return body

    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse:
        body = self.build_request(messages, tools, key)
        cache_request = {k: v for k, v in body.items() if k not in _TAG_FIELDS}
        if self._cache is not None:
            stored = self._cache.get(cache_request, key)
            if stored is not None:
                self._counters["teacher/cache_hits"] += 1
                return self._deliver(self._from_cache(stored))
        try:
            response = await self._request_with_retries(body)
        except _SetAside as aside:
            self._paid(key, aside.usage)
            self._counters[f"teacher/errors/{aside.kind}"] += 1
            if self._cache is not None:
                self._cache.put(cache_request, key, {"set_aside": {"kind": aside.kind, "message": str(aside)}, "usage": aside.usage.as_dict()})
            raise ClientError(aside.kind, str(aside), aside.usage) from None
        except ClientError as e:
            if e.usage is not None:
                self._paid(key, e.usage)
            self._counters[f"teacher/errors/{e.kind}"] += 1
            raise
        except TeacherAuthError:
            self._counters["teacher/errors/auth"] += 1
            raise
        assert response.usage is not None
        self._paid(key, response.usage)
        if self._cache is not None:
            self._cache.put(cache_request, key, _response_to_dict(response))
        return self._deliver(response)

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Counters since construction (or the last `reset=True` call), all under `teacher/`."""
        return self._session.metrics(reset, always=("requests", "retries", "cache_hits", "truncated", "empty",
                                                     "prompt_tokens", "completion_tokens", "reasoning_tokens"))

    async def aclose(self) -> None:
        await self._session.aclose()

    # ---- internals ----

    def _deliver(self, response: ChatResponse) -> ChatResponse:
        self._counters["teacher/responses"] += 1
        if response.finish_reason == "length":
            self._counters["teacher/truncated"] += 1
        return response

    def _paid(self, key: str, usage: Usage) -> None:
        for name, value in usage.as_dict().items():
            self._counters[f"teacher/{name}"] += value
        if self.on_usage is not None:
            self.on_usage(key, usage)

    def _from_cache(self, stored: dict[str, Any]) -> ChatResponse:
        usage = Usage.from_dict(stored.get("usage"))
        aside = stored.get("set_aside")
        if isinstance(aside, dict):
            kind = str(aside.get("kind", "empty"))
            self._counters[f"teacher/errors/{kind}"] += 1
            # usage=None: nothing is paid for a cache hit (ChatResponse.usage below keeps what it once cost).
            raise ClientError(kind, f"{aside.get('message', '')} (answer from the teacher cache, not paid again)")
        return ChatResponse(
            message=stored["message"],
            finish_reason=stored["finish_reason"],
            prompt_ids=stored.get("prompt_ids"),
            completion_ids=stored.get("completion_ids"),
            completion_logprobs=stored.get("completion_logprobs"),
            token_logprobs=stored.get("token_logprobs"),
            cached=True,
            usage=usage,
        )

    async def _request_with_retries(self, body: dict[str, Any]) -> ChatResponse:
        """The answer, its `usage` the sum over every answer the endpoint returned for it (`request_paid`)."""

        def read(raw: RawResponse, data: Any) -> ChatResponse:
            self._check_server(raw, data, body)
            return self._parse(data)

        response, paid = await self._session.request_paid(body, read)
        response.usage = paid
        return response

    def _parse(self, data: dict[str, Any]) -> ChatResponse:
        usage = Usage.from_json(data.get("usage"))
        try:
            response = parse_completion(data, use_token_client=self.use_token_client,
                                        top_logprobs=0 if self.use_token_client else self.sampling.top_logprobs)  # fmt: skip
        except BadLogprob as e:  # not retried (the same teacher answers the same way), never cached
            raise ClientError(e.kind, f"{self.endpoint.base_url}: {e}") from None
        except TokenFieldsMissing as e:
            self._counters["teacher/malformed"] += 1
            raise ClientError("malformed", str(e)) from None
        except ValueError as e:
            self._counters["teacher/malformed"] += 1
            raise _Retryable("malformed", f"malformed response: {e}") from None
        response.usage = usage  # this answer's; the caller replaces it by the sum over the request's attempts
        try:
            check_text(response.message)
            check_size(response, usage.completion_tokens, max_tokens=self.sampling.max_tokens, tolerance=self.sampling.max_tokens_tolerance)
        except Unusable as e:
            raise _SetAside(e.kind, str(e), usage) from None
        if is_empty(response) and response.finish_reason != "length":
            self._counters["teacher/empty"] += 1
            # A student (token client, rl mode) that says nothing is a rollout to learn from; a teacher is not.
            if not self.use_token_client:
                reasoned = " after reasoning" if response.message.get("reasoning_content") else ""
                raise _SetAside("empty", f"the teacher returned an empty answer{reasoned} (finish_reason={response.finish_reason!r})", usage)
        return response

    def _check_server(self, raw: RawResponse, data: Any, body: dict[str, Any]) -> None:
        """Warn once when the server's samples cannot follow the configured distribution."""
        if self._warned_server or self.use_token_client:
            return
        llama_cpp = raw.headers.get("server", "").lower().startswith("llama.cpp") or (isinstance(data, dict) and "timings" in data)
        if not llama_cpp:
            return
        self._warned_server = True
        defaults = {"temperature": "0.8", "top_p": "0.95", "top_k": "40", "min_p": "0.05"}
        unset = [f"{name} = {value}" for name, value in defaults.items() if name not in body]
        if unset:
            self._counters["teacher/warnings/sampling_mismatch"] += 1
            log.warning(
                "teacher %s is llama.cpp's llama-server, which samples with its own %s unless the request sets them: "
                "its answers are not the distribution orchestrator.sampling asks for. Set orchestrator.sampling."
                "temperature and top_p, and extra_body = { top_k = 0, min_p = 0.0 } (0 turns both off); see "
                "docs/distillation.md", self.endpoint.base_url, ", ".join(unset))  # fmt: skip
        if "tools" in body:
            log.warning("teacher %s is llama.cpp's llama-server: it drops `tools` silently when the model's chat "
                        "template does not render them; start it with --jinja and check one tool call by hand",
                        self.endpoint.base_url)  # fmt: skip


def _response_to_dict(r: ChatResponse) -> dict[str, Any]:
    return {"message": r.message, "finish_reason": r.finish_reason, "prompt_ids": r.prompt_ids,
            "completion_ids": r.completion_ids, "completion_logprobs": r.completion_logprobs,
            "token_logprobs": r.token_logprobs,
            "usage": r.usage.as_dict() if r.usage is not None else None}  # fmt: skip
