"""What environments see of a model: one async `chat` call. Concrete clients live beside this file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class ChatResponse:
    """One assistant turn returned by an OpenAI-compatible endpoint."""

    message: dict[str, Any]
    """The assistant message in OpenAI chat format: role, content (may be None), tool_calls, reasoning_content."""
    finish_reason: str
    """"stop", "length" (cut off by max_tokens), "tool_calls", ..."""
    prompt_ids: list[int] | None = None
    """Token client only: the prompt's token ids as the server tokenized them."""
    completion_ids: list[int] | None = None
    """Token client only: the generated token ids."""
    completion_logprobs: list[float] | None = None
    """Token client only: logprob of each generated token under the sampling policy."""
    cached: bool = False
    """True when served from the teacher response cache instead of a request."""


class ClientError(Exception):
    """A request that failed for good (after retries, or a non-retryable 4xx). `kind` is a metric name suffix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ChatClient(Protocol):
    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse:
        """Sample one assistant turn for `messages`.

        `key` identifies the rollout and turn (e.g. "env/task-17/sample-2/turn-0"): two samples of the same prompt
        get different keys, so a response cache keyed by (request, key) keeps them distinct while a resumed run
        finds each one again. Raises `ClientError` when the request fails for good.
        """
        ...
