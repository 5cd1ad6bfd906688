"""On-disk teacher response cache: a repeated or resumed run never pays twice for the same request.

Layout (sharded so no directory holds more than a few thousand files):

    cache_dir/ab/cd/abcd...64 hex....json

The name is sha256 of the canonical JSON of {"request", "key"}: the exact request body sent (model, messages,
tools, sampling; never headers, where credentials live) and the caller's rollout key, so two samples of one
prompt (different keys) stay distinct while a resumed run finds each again. The endpoint URL is deliberately
not part of the key: a teacher restarted on another port (or host) serving the same model name still hits.
Each file holds {"key", "request", "response"}; the request is kept for debugging and to detect hash collisions.
Writes are atomic and durable (apprentice.fsio): a run killed mid-write leaves no partial entry.

A stored entry is data from disk, not trusted: one that cannot be read (truncated, not UTF-8 or JSON) or has
the wrong shape is a miss with one warning naming the file, and the fresh answer overwrites it. The response
shape checked is the one the teacher client stores:

    {"message": {"role": ..., "content": str | None, ...}, "finish_reason": str,
     "prompt_ids": [int] | None, "completion_ids": [int] | None, "completion_logprobs": [float] | None,
     "token_logprobs": [{"bytes": [int], "logprob": float, "top": [[bytes, logprob], ...]}] | None (optional),
     "usage": {"prompt_tokens": int, ...} | None}

or, for an answer that was paid for but set aside (empty, oversized, invalid text), only the verdict:

    {"set_aside": {"kind": str, "message": str}, "usage": {...} | None}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from apprentice import fsio
from apprentice.clients.logprobs import token_logprobs_problem

log = logging.getLogger("apprentice.teacher_cache")

T = TypeVar("T")


def cache_digest(request: dict[str, Any], key: str) -> str:
    """Stable hex digest of one request (dict key order does not matter)."""
    canonical = json.dumps(
        {"request": request, "key": key},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Maps (endpoint, request body, key) -> a stored response dict."""

    def __init__(self, cache_dir: Path, check: Callable[[Any], str | None] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.check = check or response_problem
        """What is wrong with a stored response (None: usable); other response shapes (clients/scoring.py) pass
        their own."""

    def path_for(self, request: dict[str, Any], key: str) -> Path:
        digest = cache_digest(request, key)
        return self.cache_dir / digest[:2] / digest[2:4] / f"{digest}.json"

    def get(self, request: dict[str, Any], key: str) -> dict[str, Any] | None:
        """The stored response, or None (a miss) when there is none or it cannot be trusted."""
        path = self.path_for(request, key)
        try:
            entry = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            _warn_unusable(path, f"unreadable ({type(e).__name__}: {str(e)[:120]})")
            return None
        if not isinstance(entry, dict):
            _warn_unusable(path, f"holds a JSON {type(entry).__name__}, not an object")
            return None
        # A sha256 collision is not a practical concern, but a hand-edited or foreign file must not be trusted.
        if entry.get("key") != key or entry.get("request") != json.loads(json.dumps(request)):
            return None
        response = entry.get("response")
        problem = self.check(response)
        if problem is not None:
            _warn_unusable(path, problem)
            return None
        assert isinstance(response, dict)  # for mypy: response_problem checked it
        return response

    def put(self, request: dict[str, Any], key: str, response: dict[str, Any]) -> Path:
        path = self.path_for(request, key)
        entry = {"key": key, "request": request, "response": response}
        try:
            text = json.dumps(entry, ensure_ascii=False)
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (valid JSON, not UTF-8): store it escaped, losslessly
            data = json.dumps(entry, ensure_ascii=True).encode("ascii")
        fsio.write_bytes(path, data)
        return path


def _warn_unusable(path: Path, problem: str) -> None:
    log.warning("teacher cache entry %s %s; treating it as a miss (the new answer replaces it)", path, problem)


def _is_list_of(value: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, list) and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)


def response_problem(response: Any) -> str | None:
    """What is wrong with a stored response's shape (see the module docstring), or None when it is usable."""
    if not isinstance(response, dict):
        return f"has a response of type {type(response).__name__}, not an object"
    if not isinstance(response.get("usage"), (dict, type(None))):
        return "has a usage that is not an object"
    if "set_aside" in response:
        verdict = response["set_aside"]
        if not (isinstance(verdict, dict) and isinstance(verdict.get("kind"), str) and isinstance(verdict.get("message"), str)):
            return "has a set_aside verdict without a kind and message"
        return None
    message = response.get("message")
    if not isinstance(message, dict):
        return "has no message object in its response"
    if not isinstance(message.get("content"), (str, type(None))):
        return "has a message content that is neither text nor null"
    if not isinstance(message.get("tool_calls"), (list, type(None))):
        return "has tool_calls that are not a list"
    if not isinstance(response.get("finish_reason"), str):
        return "has no finish_reason string"
    for name, kinds in (("prompt_ids", (int,)), ("completion_ids", (int,)), ("completion_logprobs", (int, float))):
        value = response.get(name)
        if value is not None and not _is_list_of(value, kinds):
            return f"has a {name} that is not a list of numbers"
    problem = token_logprobs_problem(response.get("token_logprobs"))
    if problem is not None:
        return problem
    ids, lps = response.get("completion_ids"), response.get("completion_logprobs")
    if ids is not None and lps is not None and len(ids) != len(lps):
        return f"has {len(ids)} completion ids but {len(lps)} logprobs"
    return None


class SharedRequests:
    """Identical requests in flight at once share one answer. The cache only helps once an answer is stored; a
    GRPO group's identical samples (short answers at low temperature) are scored at the same moment, and each
    copy would pay the teacher. An error reaches every caller alike and is not remembered (a later call asks
    again). With `remember` > 0 the last answers also stay (an in-memory cache; all dropped once more than
    `remember` are held)."""

    def __init__(self, on_shared: Callable[[], None] = lambda: None, *, remember: int = 0) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}
        self._on_shared = on_shared
        """Called for each caller that joins a request in flight (or a remembered answer) instead of sending one."""
        self.remember = remember

    async def run(self, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`'s answer: of the request with this key in flight (or remembered), or of a new one."""
        running = self._running.get(key)
        if running is not None:
            self._on_shared()
            return await asyncio.shield(running)
        if self.remember and len(self._running) > self.remember:
            self._running.clear()
        task: asyncio.Future[T] = asyncio.ensure_future(call())
        self._running[key] = task

        def settle(done: asyncio.Future[T]) -> None:
            # retrieved: a caller cancelled meanwhile must not leave it "never retrieved"
            failed = done.cancelled() or done.exception() is not None
            if (failed or not self.remember) and self._running.get(key) is done:
                del self._running[key]

        task.add_done_callback(settle)
        # shield: one caller cancelled (its rollout dropped) does not cancel the answer the others wait for
        return await asyncio.shield(task)
