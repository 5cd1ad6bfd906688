"""What environments see of a model: one async `chat` call. Concrete clients live beside this file."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from apprentice.errors import ApprenticeError


@dataclass(frozen=True)
class Usage:
    """Tokens one request was billed for, as the server reported them (0 where it reported nothing)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Everything generated, reasoning included (OpenAI's convention; llama.cpp and vLLM count the same way)."""
    reasoning_tokens: int = 0
    """The part of completion_tokens spent on reasoning (`usage.completion_tokens_details.reasoning_tokens`)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens the provider served from its prompt cache (`usage.prompt_tokens_details.cached_tokens`)."""

    @staticmethod
    def from_json(usage: Any) -> Usage:
        """From a response's `usage` object; anything missing or malformed counts as 0."""
        if not isinstance(usage, dict):
            return Usage()
        completion_details = usage.get("completion_tokens_details")
        prompt_details = usage.get("prompt_tokens_details")
        return Usage(
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            reasoning_tokens=_count(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0,
            cached_prompt_tokens=_count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        )

    @staticmethod
    def from_dict(stored: Any) -> Usage | None:
        """From `as_dict()` output read back from disk; None when there is none."""
        if not isinstance(stored, dict):
            return None
        return Usage(**{name: _count(stored.get(name)) for name in Usage.__dataclass_fields__})

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "reasoning_tokens": self.reasoning_tokens, "cached_prompt_tokens": self.cached_prompt_tokens}  # fmt: skip

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(self.as_dict().values(), other.as_dict().values(), strict=True)))

    @property
    def total_tokens(self) -> int:
        """What a token cap counts: prompt plus completion tokens (reasoning is inside completion)."""
        return self.prompt_tokens + self.completion_tokens

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{name}": float(value) for name, value in self.as_dict().items()}


def _count(value: Any) -> int:
    """A token count as reported: a non-negative finite number (JSON's 1e999 reads as inf), else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        return 0
    return int(value)


@dataclass
class ChatResponse:
    """One assistant turn returned by an OpenAI-compatible endpoint."""

    message: dict[str, Any]
    """The assistant message in OpenAI chat format: role, content (may be None), tool_calls, reasoning_content
    (the teacher's reasoning, whether it came as `reasoning_content`, `reasoning` or a `<think>` block)."""
    finish_reason: str
    """"stop", "length" (cut off by max_tokens), "tool_calls", ..."""
    prompt_ids: list[int] | None = None
    """Token client only: the prompt's token ids as the server tokenized them."""
    completion_ids: list[int] | None = None
    """Token client only: the generated token ids."""
    completion_logprobs: list[float] | None = None
    """Token client only: logprob of each generated token under the sampling policy."""
    token_logprobs: list[dict[str, Any]] | None = None
    """Only when `sampling.top_logprobs` asked: per generated token `{"bytes": [int], "logprob": float,
    "top": [[bytes, logprob], ...]}` (the token's UTF-8 bytes, its logprob, and the teacher's top alternatives,
    most likely first), every logprob checked (clients/logprobs.py); None when not asked or not returned."""
    cached: bool = False
    """True when served from the teacher response cache instead of a request."""
    usage: Usage | None = None
    """What the request that produced this answer was billed (also on cache hits, where nothing was paid now)."""


class ClientError(Exception):
    """A request that failed for good (after retries, a non-retryable 4xx, or an answer set aside as unusable).

    `kind` is a metric name suffix (`teacher/errors/<kind>`). `usage` is set when the teacher answered and was
    paid (an empty, oversized or invalid answer), so spend accounting sees it; None when nothing was billed.
    """

    def __init__(self, kind: str, message: str, usage: Usage | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.usage = usage


class TeacherAuthError(ApprenticeError):
    """The endpoint refused our credentials (401/403) or the API-key variable is unset: every further request
    would fail the same way, so the run stops with this message (exit code 1) instead of setting rollouts aside.

    Deliberately not a `ClientError`: code that sets failed rollouts aside must not swallow it.
    """

    kind = "auth"


class Budget(Protocol):
    """What an endpoint may still be paid (the run's spend ledger, orchestrator/spend.py). A session with a budget
    asks `check` before every attempt and charges it the usage of every answer the endpoint returned, usable or
    not: a malformed answer that is retried, or one with a bad logprob, was billed all the same."""

    def check(self) -> None:
        """Raise (`SpendCapReached`) when no further request may be sent."""
        ...

    def add(self, usage: Usage) -> None: ...


class ChatClient(Protocol):
    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse:
        """Sample one assistant turn for `messages`.

        `key` identifies the rollout and turn (e.g. "env/task-17/sample-2/turn-0"): two samples of the same prompt
        get different keys, so a response cache keyed by (request, key) keeps them distinct while a resumed run
        finds each one again. Raises `ClientError` when the request fails for good, `TeacherAuthError` when the
        endpoint refuses the credentials.
        """
        ...
