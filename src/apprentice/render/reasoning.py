"""Reasoning policy and the one definition of a think block.

A teacher's reasoning arrives as a field (`reasoning_content`, or the older names `thinking` / `reasoning`) or
inline as a `<think>...</think>` block at the start of the content. `split_think` is the single definition of
where the reasoning ends and the answer starts (envs/trajectory.py scores answers with it too):

    "<think>a</think> Paris"  -> reasoning "a", answer "Paris"
    "</think> Paris"          -> reasoning "",  answer "Paris"   (the prompt opened the block; the model closed it)
    "<think>cut off"          -> reasoning "cut off", answer ""  (an unclosed block runs to the end: cut off)
    "Paris"                   -> no reasoning, answer "Paris"

Policy ("orchestrator.reasoning"):
- "keep" (default): train on the reasoning as generated. If the student's template reads reasoning fields
  (Qwen3, gpt-oss, ...), they are passed through; otherwise the reasoning is folded into the content as a
  `<think>...</think>` block, so it is never silently lost.
- "drop": train on the answer only (for teacher APIs that hide or summarise reasoning): reasoning fields are
  removed and think blocks are cut from assistant content.
"""

from __future__ import annotations

import re
from typing import Any, Literal

Reasoning = Literal["keep", "drop"]
Message = dict[str, Any]

OPEN, CLOSE = "<think>", "</think>"
# The names transformers passes reasoning under (`_REASONING_FIELDS` there); the first is the standard one.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_READS_REASONING = re.compile(
    r"\.\s*(?:reasoning_content|thinking|reasoning)\b"
    r"|\[\s*['\"](?:reasoning_content|thinking|reasoning)['\"]\s*\]"
    r"|get\(\s*['\"](?:reasoning_content|thinking|reasoning)['\"]"
    r"|['\"](?:reasoning_content|thinking|reasoning)['\"]\s+in\s+message"
)


def template_reads_reasoning(template: str) -> bool:
    """Whether a chat template reads a message's reasoning field (else "keep" folds it into the content)."""
    return _READS_REASONING.search(template) is not None


def split_think(content: str) -> tuple[str | None, str, bool]:
    """(reasoning or None, answer, closed) of assistant text; see the module docstring for the cases.

    Only a block at the start counts (leading whitespace allowed): `<think>` later in an answer is answer text.
    The answer loses the whitespace that separates it from the block; `closed` is False for a cut-off block.
    """
    head = content.lstrip()
    if head.startswith(OPEN):
        inner = head[len(OPEN) :]
        end = inner.find(CLOSE)
        if end < 0:
            return inner, "", False
        return inner[:end], inner[end + len(CLOSE) :].lstrip(), True
    end = content.find(CLOSE)
    if end >= 0 and OPEN not in content[:end]:
        return content[:end], content[end + len(CLOSE) :].lstrip(), True
    return None, content, True


def strip_think(content: str) -> str:
    """`content` without its think block (and the whitespace after it): the answer."""
    return split_think(content)[1]


def reasoning_of(message: Message) -> str | None:
    """The message's reasoning: a non-empty reasoning field, else an inline think block; None if it has none."""
    for field in REASONING_FIELDS:
        value = message.get(field)
        if isinstance(value, str) and value:
            return value
    content = message.get("content")
    if isinstance(content, str):
        return split_think(content)[0]
    return None


def apply_reasoning(message: Message, policy: Reasoning, template_reads: bool) -> Message:
    """A copy of `message` with the reasoning policy applied (assistant messages only; never mutates)."""
    if message.get("role") != "assistant":
        return message
    content = message.get("content")
    field = next((message[f] for f in REASONING_FIELDS if isinstance(message.get(f), str) and message[f]), None)
    if policy == "drop":
        out = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
        if isinstance(content, str):
            out["content"] = strip_think(content)
        return out
    if field is None or template_reads:
        return message
    if isinstance(content, str) and split_think(content)[0] is not None:  # already inline; the field duplicates it
        return {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    out = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    out["content"] = f"{OPEN}\n{field.strip()}\n{CLOSE}\n\n{content or ''}"
    return out
