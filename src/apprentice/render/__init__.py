"""trajectory -> TrainingSample: exact token ids and loss masks, from server tokens or from chat messages.

`render_trajectory` is the fixed entry point (DESIGN.md section 4); `render_many` renders a batch, setting
aside (and counting) trajectories that cannot be rendered faithfully.
"""

from __future__ import annotations

from typing import Any

from apprentice.render.errors import RenderError
from apprentice.render.messages import render_messages
from apprentice.render.normalize import ToolCallArguments, tool_call_for_template
from apprentice.render.reasoning import Reasoning
from apprentice.render.stats import RenderStats
from apprentice.render.tokens import render_tokens
from apprentice.types import TrainingSample

__all__ = [
    "RenderError",
    "RenderStats",
    "ToolCallArguments",
    "tool_call_for_template",
    "render_many",
    "render_trajectory",
]


def render_trajectory(
    trajectory: dict[str, Any],
    tokenizer: Any,
    *,
    tools: list[dict] | None = None,
    reasoning: Reasoning = "keep",
    template_kwargs: dict[str, Any] | None = None,
    allow_control_tokens: bool = False,
    tool_call_arguments: ToolCallArguments = "dict",
) -> list[TrainingSample]:
    """Samples for one trajectory; raises RenderError (with `.kind`) if it cannot be rendered faithfully.

    Token path when every step carries server `tokens` (ids used as returned, logprobs carried, advantage from
    `trajectory["advantage"]`, default 1.0); otherwise the message path through the tokenizer's chat template
    (logprobs 0.0, advantage 1.0). `tools` defaults to `trajectory["tools"]`; `reasoning` ("keep" | "drop",
    message path only) is the teacher-reasoning policy; `template_kwargs` go to the chat template (e.g.
    `{"enable_thinking": True}`); `allow_control_tokens` keeps teacher text that holds special tokens of the
    student's tokenizer (set aside as `control_token` by default). `tool_call_arguments` says how the student's
    serving engine hands tool-call arguments to its template: "dict" (vLLM, SGLang: the parsed JSON object) or
    "string" (llama.cpp: the JSON string where the template renders it as the object). The last turn of a trajectory with
    `truncated` set (or a step with `finish_reason: "length"`) was cut off by max_tokens: it is trained without
    an end-of-turn token. messages.py documents the algorithm.
    """
    steps = list(trajectory.get("steps") or [])
    if steps and all(step.get("tokens") for step in steps):
        return render_tokens(steps, float(trajectory.get("advantage", 1.0)))
    tools = tools if tools is not None else trajectory.get("tools")
    return render_messages(
        steps,
        tokenizer,
        tools,
        reasoning,
        template_kwargs,
        truncated=bool(trajectory.get("truncated")),
        allow_control_tokens=allow_control_tokens,
        tool_call_arguments=tool_call_arguments,
    )


def render_many(
    trajectories: list[dict[str, Any]],
    tokenizer: Any,
    *,
    tools: list[dict] | None = None,
    reasoning: Reasoning = "keep",
    template_kwargs: dict[str, Any] | None = None,
    allow_control_tokens: bool = False,
    tool_call_arguments: ToolCallArguments = "dict",
) -> tuple[list[TrainingSample], RenderStats]:
    """Render a batch; a RenderError sets that trajectory aside and is counted in the stats, never raised."""
    stats = RenderStats()
    samples: list[TrainingSample] = []
    for trajectory in trajectories:
        try:
            out = render_trajectory(
                trajectory,
                tokenizer,
                tools=tools,
                reasoning=reasoning,
                template_kwargs=template_kwargs,
                allow_control_tokens=allow_control_tokens,
                tool_call_arguments=tool_call_arguments,
            )
        except RenderError as err:
            stats.add_error(err)
            continue
        stats.add(out)
        samples.extend(out)
    return samples, stats
