"""From a chat-completions response body to a `ChatResponse`, and the checks that decide an answer is unusable.

Every provider's reasoning reaches the trajectory the same way, as the assistant message's `reasoning_content`:
`reasoning_content` (DeepSeek, vLLM), `reasoning` (OpenRouter, newer vLLM) or a leading `<think>...</think>`
block inside `content` (servers without a reasoning parser). The orchestrator's `reasoning` policy then keeps or
drops it in one place (render/reasoning.py).

An answer the teacher did send but that cannot be trained on raises `Unusable` with a kind:
  - `invalid_text`: bytes that are not UTF-8, or a lone surrogate (`"\\ud800"`, valid JSON but no text);
  - `oversized`: more than max_tokens * (1 + tolerance) tokens by the server's own usage, or by its text
    (at `MAX_CHARS_PER_TOKEN` characters per token) when usage is missing or wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from apprentice.clients.base import ChatResponse
from apprentice.clients.logprobs import parse_token_logprobs
from apprentice.render.reasoning import split_think
from apprentice.trajectory import normalize_tool_call

MAX_CHARS_PER_TOKEN = 32
"""Generous: BPE tokens average ~4 characters; the longest ones (runs of spaces, long words) stay well below 32."""



class TokenFieldsMissing(ValueError):
    """The token client asked for token ids / logprobs and the server did not return them (not worth a retry)."""


class Unusable(ValueError):
    """The teacher answered, but the answer must not be trained on; `kind` names why (a metric suffix)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode_body(raw: bytes) -> Any:
    """The JSON of a response body; `Unusable("invalid_text")` for bytes that are not UTF-8, ValueError if not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unusable("invalid_text", f"the response holds bytes that are not UTF-8 (at byte {e.start}): set aside, never trained as U+FFFD") from None
    return json.loads(text)


def check_text(message: dict[str, Any]) -> None:
    """`Unusable("invalid_text")` when a string of the message cannot be encoded (a lone surrogate)."""
    for path, text in _strings(message, "message"):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Unusable("invalid_text", f"{path} holds a lone surrogate ({text[e.start]!r} at {e.start}), which is not text: set aside") from None


def check_size(response: ChatResponse, completion_tokens: int, *, max_tokens: int, tolerance: float) -> None:
    """`Unusable("oversized")` when the answer is longer than max_tokens allows (the teacher ignored it)."""
    limit = math.ceil(max_tokens * (1.0 + tolerance))
    if completion_tokens > limit:
        raise Unusable("oversized", f"the teacher generated {completion_tokens} tokens (usage.completion_tokens) with "
                                    f"max_tokens = {max_tokens}: it ignored the limit; set aside")  # fmt: skip
    chars = sum(len(text) for _, text in _strings(response.message, "message"))
    if chars > limit * MAX_CHARS_PER_TOKEN:
        raise Unusable("oversized", f"the teacher's answer has {chars} characters, more than max_tokens = {max_tokens} "
                                    f"tokens can hold (at most {MAX_CHARS_PER_TOKEN} per token): it ignored the limit; set aside")  # fmt: skip


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def _text(content: Any) -> str | None:
    """Message content as a string: None, a string, or a list of content parts (text parts joined)."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError(f"message.content has unexpected type {type(content).__name__}")


def parse_completion(data: Any, *, use_token_client: bool, top_logprobs: int = 0) -> ChatResponse:
    """First choice of a chat-completions JSON body as a normalised `ChatResponse`; ValueError if malformed
    (`BadLogprob`, a ValueError, for a logprob that must not be trained on). With `top_logprobs`, the choice's
    `logprobs.content` becomes `token_logprobs` (None when the server sent none)."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no 'choices' array")
    choice = data["choices"][0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise ValueError("choices[0] has no 'message' object")
    raw = choice["message"]
    content = _text(raw.get("content"))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if raw.get("tool_calls"):
        if not isinstance(raw["tool_calls"], list):
            raise ValueError("message.tool_calls is not an array")
        if not all(isinstance(c, dict) for c in raw["tool_calls"]):
            raise ValueError(f"message.tool_calls holds a call that is not an object: {raw['tool_calls']!r}")
        message["tool_calls"] = [dict(normalize_tool_call(c, "")) for c in raw["tool_calls"]]
    reasoning = raw.get("reasoning_content") or raw.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        message["reasoning_content"] = reasoning
    elif content is not None and not use_token_client:
        # A teacher's inline <think> block is moved to reasoning_content like the fields above. Token-client
        # answers stay as generated: their token ids are the text, split or not.
        inline, answer, _closed = split_think(content)  # the one definition, shared with render and rewards
        if inline is not None:
            message["content"] = answer
            if inline.strip():
                message["reasoning_content"] = inline.strip()
    response = ChatResponse(message=message, finish_reason=str(choice.get("finish_reason") or "unknown"))
    if top_logprobs:
        response.token_logprobs = parse_token_logprobs(choice.get("logprobs"))
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


def is_empty(response: ChatResponse) -> bool:
    content = response.message.get("content")
    return not (content and content.strip()) and not response.message.get("tool_calls")
