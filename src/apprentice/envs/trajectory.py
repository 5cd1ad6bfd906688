"""Building trajectories (`apprentice.trajectory.Trajectory`, DESIGN.md section 4) from chat responses, shared by
every built-in environment. Environments keep their running conversation as plain dicts (what the client sends);
these builders are where it becomes the typed record.

The assistant message stored in a trajectory (and sent back to the model on the next turn) is rebuilt from the
response with only chat-format fields, so provider extras (`refusal`, `annotations`, `audio`, ...) never leak
into the conversation or the next request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from apprentice.clients.base import ChatResponse, ClientError
from apprentice.render.reasoning import strip_think
from apprentice.trajectory import Message, StepTokens, Trajectory, TrajectoryStep, normalize_tool_call


def assistant_message(response: ChatResponse, turn: int) -> Message:
    """The response's assistant message with chat-format fields only.

    Tool calls go through `normalize_tool_call`: ids when the server gave none (`call_{turn}_{i}`), so every tool
    message can point at its call, and dict arguments serialised to the JSON string the OpenAI format requires.
    """
    raw = response.message
    content = raw.get("content")
    msg: Message = {"role": "assistant", "content": content if isinstance(content, str) else None}
    reasoning = raw.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        msg["reasoning_content"] = reasoning
    try:
        calls = [normalize_tool_call(call, f"call_{turn}_{i}") for i, call in enumerate(raw.get("tool_calls") or [])]
    except ValueError as e:  # a server's broken call: the rollout is set aside like any malformed response
        raise ClientError("malformed", str(e)) from e
    if calls:
        msg["tool_calls"] = calls
    elif msg.get("content") is None:
        # A turn with neither text nor calls is still a (empty) assistant turn; "" keeps templates happy.
        msg["content"] = ""
    return msg


def messages(conversation: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Copies of chat messages as trajectory `Message`s (every message has a role; fields are the chat format's)."""
    return [cast(Message, dict(m)) for m in conversation]


def make_step(prompt: Sequence[Mapping[str, Any]], completion: Sequence[Mapping[str, Any]], response: ChatResponse) -> TrajectoryStep:
    """One step: a copy of the conversation so far, the assistant message(s), and token ids when the server sent
    all of them (token client only)."""
    step: TrajectoryStep = {"prompt": messages(prompt), "completion": messages(completion)}
    if (
        response.prompt_ids is not None
        and response.completion_ids is not None
        and response.completion_logprobs is not None
    ):
        tokens: StepTokens = {
            "prompt_ids": list(response.prompt_ids),
            "completion_ids": list(response.completion_ids),
            "completion_logprobs": list(response.completion_logprobs),
        }
        step["tokens"] = tokens
    if response.token_logprobs is not None:  # off-policy soft targets (sampling.top_logprobs)
        step["teacher_logprobs"] = response.token_logprobs
    return step


def make_trajectory(
    *,
    env: str,
    task_id: str,
    steps: list[TrajectoryStep],
    tools: list[dict[str, Any]] | None,
    reward: float,
    metrics: dict[str, float],
    truncated: bool,
) -> Trajectory:
    return {
        "steps": steps,
        "tools": tools,
        "reward": reward,  # checked (not converted) by the orchestrator: envs/reward_check.py
        "metrics": metrics,
        "error": None,
        "task_id": task_id,
        "env": env,
        "truncated": truncated,
    }


def answer_text(message: Mapping[str, Any]) -> str:
    """The text an assistant message answers with: its content without `<think>` blocks (reasoning is not the
    answer, whether the server split it into `reasoning_content` or left it inline; one definition of a think
    block for scoring and rendering: render/reasoning.py)."""
    return strip_think(message.get("content") or "").strip()
