"""Building trajectory dicts (DESIGN.md section 4) from chat responses, shared by every built-in environment.

The assistant message stored in a trajectory (and sent back to the model on the next turn) is rebuilt from the
response with only chat-format fields, so provider extras (`refusal`, `annotations`, `audio`, ...) never leak
into the conversation or the next request.
"""

from __future__ import annotations

import json
from typing import Any

from apprentice.clients.base import ChatResponse
from apprentice.render.reasoning import strip_think


def assistant_message(response: ChatResponse, turn: int) -> dict[str, Any]:
    """The response's assistant message with chat-format fields only.

    Tool calls get ids when the server gave none (`call_{turn}_{i}`), so every tool message can point at its
    call, and dict arguments are serialised to the JSON string the OpenAI format requires.
    """
    raw = response.message
    content = raw.get("content")
    msg: dict[str, Any] = {"role": "assistant", "content": content if isinstance(content, str) else None}
    reasoning = raw.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        msg["reasoning_content"] = reasoning
    calls = []
    for i, call in enumerate(raw.get("tool_calls") or []):
        fn = call.get("function") or {}
        args = fn.get("arguments", "")
        calls.append(
            {
                "id": call.get("id") or f"call_{turn}_{i}",
                "type": "function",
                "function": {
                    "name": str(fn.get("name", "")),
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    if calls:
        msg["tool_calls"] = calls
    elif msg["content"] is None:
        # A turn with neither text nor calls is still a (empty) assistant turn; "" keeps templates happy.
        msg["content"] = ""
    return msg


def make_step(prompt: list[dict[str, Any]], completion: list[dict[str, Any]], response: ChatResponse) -> dict[str, Any]:
    """One step: a copy of the conversation so far, the assistant message(s), and token ids when the server sent
    all of them (token client only)."""
    step: dict[str, Any] = {"prompt": [dict(m) for m in prompt], "completion": [dict(m) for m in completion]}
    if (
        response.prompt_ids is not None
        and response.completion_ids is not None
        and response.completion_logprobs is not None
    ):
        step["tokens"] = {
            "prompt_ids": list(response.prompt_ids),
            "completion_ids": list(response.completion_ids),
            "completion_logprobs": list(response.completion_logprobs),
        }
    return step


def make_trajectory(
    *,
    env: str,
    task_id: str,
    steps: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    reward: float,
    metrics: dict[str, float],
    truncated: bool,
) -> dict[str, Any]:
    return {
        "steps": steps,
        "tools": tools,
        "reward": float(reward),
        "metrics": metrics,
        "error": None,
        "task_id": task_id,
        "env": env,
        "truncated": truncated,
    }


def answer_text(message: dict[str, Any]) -> str:
    """The text an assistant message answers with: its content without `<think>` blocks (reasoning is not the
    answer, whether the server split it into `reasoning_content` or left it inline; one definition of a think
    block for scoring and rendering: render/reasoning.py)."""
    return strip_think(message.get("content") or "").strip()
