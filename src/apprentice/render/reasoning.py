"""Reasoning policy: what happens to a teacher's reasoning (`reasoning_content` or `<think>` blocks) before rendering.

- "keep" (default): train on the reasoning as generated. If the student's template renders reasoning fields
  itself (Qwen3, gpt-oss, ...), they are passed through; if the template ignores them, the reasoning is folded
  into the content as a `<think>...</think>` block, so it is never silently lost.
- "drop": train on the answer only (for teacher APIs that hide or summarise reasoning): reasoning fields are
  removed and `<think>...</think>` blocks are cut from assistant content.
"""

from __future__ import annotations

import re
from typing import Any, Literal

Reasoning = Literal["keep", "drop"]
Message = dict[str, Any]

# The names transformers passes reasoning under (`_REASONING_FIELDS` there); the first is the standard one.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_READS_REASONING = re.compile(
    r"\.\s*(?:reasoning_content|thinking|reasoning)\b"
    r"|\[\s*['\"](?:reasoning_content|thinking|reasoning)['\"]\s*\]"
    r"|get\(\s*['\"](?:reasoning_content|thinking|reasoning)['\"]"
)
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)
_UNOPENED_THINK = re.compile(r"^.*?</think>\s*", re.DOTALL)  # models whose prompt opens <think> emit only the close


def template_reads_reasoning(template: str) -> bool:
    """Whether a chat template reads a message's reasoning field (else "keep" folds it into the content)."""
    return _READS_REASONING.search(template) is not None


def reasoning_of(message: Message) -> str | None:
    for field in REASONING_FIELDS:
        value = message.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def strip_think(content: str) -> str:
    """`content` without `<think>...</think>` blocks (and the whitespace after them)."""
    content = _THINK_BLOCK.sub("", content)
    if "</think>" in content:
        content = _UNOPENED_THINK.sub("", content, count=1)
    return content


def apply_reasoning(message: Message, policy: Reasoning, template_reads: bool) -> Message:
    """A copy of `message` with the reasoning policy applied (assistant messages only; never mutates)."""
    if message.get("role") != "assistant":
        return message
    reasoning = reasoning_of(message)
    content = message.get("content")
    if policy == "drop":
        out = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
        if isinstance(content, str):
            out["content"] = strip_think(content)
        return out
    if reasoning is None or template_reads:
        return message
    if isinstance(content, str) and "<think>" in content:  # already inline; the field is a duplicate
        return {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    out = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    out["content"] = f"<think>\n{reasoning.strip()}\n</think>\n\n{content or ''}"
    return out
