"""The trajectory record (DESIGN.md section 4) that environments produce and the orchestrator and render consume.

TypedDicts rather than classes: a trajectory stays a plain JSON-able dict (user environments may build one by
hand, `render_trajectory` accepts any dict of this shape), while mypy checks every built-in producer and
consumer against one definition. Builders live in `apprentice.envs.trajectory`.

    Trajectory
      steps: [TrajectoryStep]        one per model turn, in order
        prompt:     [Message]        the whole conversation before the turn
        completion: [Message]        the assistant message(s) of the turn
        tokens:     StepTokens       only when the server returned ids and logprobs (token client)
      tools, reward, metrics, error, task_id, env, truncated, (policy_step, advantage, error_message)

Step k+1's prompt extends step k's prompt + completion (+ tool/user messages in between).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, NotRequired, Required, TypedDict


class ToolCallFunction(TypedDict):
    name: str
    arguments: str
    """The arguments as a JSON string (the OpenAI chat format), even when a server sent an object."""


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class Message(TypedDict, total=False):
    """One chat message in OpenAI format; only `role` is always present."""

    role: Required[str]
    """"system" | "user" | "assistant" | "tool"."""
    content: str | None
    tool_calls: list[ToolCall]
    tool_call_id: str
    """tool messages: the id of the call they answer."""
    name: str
    reasoning_content: str
    """assistant messages: the teacher's reasoning, whichever field or think block the server used."""


class StepTokens(TypedDict):
    """Token-client steps only: the ids the server saw and sampled, and each sampled token's logprob."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_logprobs: list[float]
    """[len(completion_ids)]"""


class TrajectoryStep(TypedDict):
    prompt: list[Message]
    completion: list[Message]
    tokens: NotRequired[StepTokens]
    teacher_logprobs: NotRequired[list[dict[str, Any]]]
    """Only with orchestrator.sampling.top_logprobs: the teacher's per-token logprobs of its turn, as
    `ChatResponse.token_logprobs` ({"bytes", "logprob", "top": [[bytes, logprob], ...]} per generated token)."""


class Trajectory(TypedDict):
    steps: list[TrajectoryStep]
    tools: list[dict[str, Any]] | None
    """OpenAI tool schemas offered to the model, or None."""
    reward: float
    metrics: dict[str, float]
    """Bare names ("num_turns"); the orchestrator prefixes them with `rollout/{env}/`."""
    error: str | None
    """Why the rollout failed ("client/timeout", ...), or None."""
    task_id: str
    env: str
    truncated: bool
    """A turn was cut off by max_tokens."""
    error_message: NotRequired[str]
    """The failure's message, for the user (never trained on)."""
    advantage: NotRequired[float]
    """rl mode: the sequence-level advantage; render defaults it to 1.0."""
    policy_step: NotRequired[int]
    """The policy (trainer step of the weights) that generated it: 0 = the initial model; in distill mode always 0."""
    set_aside: NotRequired[str]
    """rl mode: why the batch leaves it out although it was scored ("zero_advantage")."""


def normalize_tool_call(call: Mapping[str, Any], fallback_id: str) -> ToolCall:
    """A server's tool call in the chat format: an id (`fallback_id` when the server gave none, so a tool message
    can point at it), type "function", and the arguments as a JSON string (some servers send an object).

    Raises ValueError when there is no function object or no function name: such a call cannot be executed or
    rendered.
    """
    fn = call.get("function")
    if not isinstance(fn, Mapping):
        raise ValueError(f"tool call without a function object: {dict(call)!r}")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call without a name: {dict(call)!r}")
    arguments = fn.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {"id": str(call.get("id") or fallback_id), "type": "function", "function": {"name": name, "arguments": arguments}}


def parsed_arguments(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as vLLM hands them to a chat template: the JSON string parsed into an object; missing,
    null or empty arguments are `{}`. Raises ValueError when they are not a JSON object (vLLM then renders `{}`)."""
    parsed = json.loads(arguments) if isinstance(arguments, str) and arguments else arguments or {}
    if not isinstance(parsed, dict):
        raise ValueError(f"tool call arguments are not a JSON object: {arguments!r}")
    return parsed
