"""The multi-turn tool loop: the model calls tools, gets their results as `tool` messages, and answers.

An episode ends when the model answers without a tool call, when a turn is cut off by max_tokens, or after
`max_turns` model turns. Broken tool calls (invalid JSON arguments, an unknown tool, a tool that refuses its
input) are answered with an error message the model can read and recover from; they never end the episode.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apprentice.clients.base import ChatClient
from apprentice.envs.base import Split, Task
from apprentice.envs.reward_check import reward_function
from apprentice.envs.single_turn import ScoreFn
from apprentice.envs.trajectory import answer_text, assistant_message, make_step, make_trajectory
from apprentice.trajectory import ToolCall, Trajectory, TrajectoryStep


class ToolError(ValueError):
    """A tool call the tool refuses (bad arguments, bad input); the message is returned to the model."""


@dataclass(frozen=True)
class Tool:
    schema: dict[str, Any]
    """OpenAI function-tool schema: {"type": "function", "function": {"name", "description", "parameters"}}."""
    fn: Callable[[dict[str, Any]], str]
    """Parsed arguments -> result text; raises ToolError (or ValueError) for input it cannot handle."""

    @property
    def name(self) -> str:
        return str(self.schema["function"]["name"])


class ToolEnv:
    """An environment whose episodes are a tool-calling conversation scored on the final answer by `score`."""

    def __init__(
        self, name: str, train: list[Task], eval: list[Task], tools: list[Tool], score: ScoreFn, max_turns: int
    ) -> None:
        self.name = name
        self.tools: list[dict[str, Any]] | None = [t.schema for t in tools]
        self._by_name = {t.name: t for t in tools}
        self._splits: dict[str, list[Task]] = {"train": train, "eval": eval}
        self._score = score
        self.max_turns = max_turns

    def tasks(self, split: Split) -> list[Task]:
        if split not in self._splits:
            raise ValueError(f"environment {self.name!r}: unknown split {split!r}; use 'train' or 'eval'")
        return list(self._splits[split])

    def call_tool(self, call: ToolCall) -> tuple[str, bool]:
        """(result text, ok) for one tool call of an assistant message."""
        name, raw_args = call["function"]["name"], call["function"]["arguments"]
        tool = self._by_name.get(name)
        if tool is None:
            return f"Error: unknown tool {name!r}; available tools: {', '.join(sorted(self._by_name))}", False
        try:
            args = json.loads(raw_args) if raw_args.strip() else {}
        except json.JSONDecodeError as e:
            return f"Error: the arguments of {name} are not valid JSON ({e.msg}): {raw_args}", False
        if not isinstance(args, dict):
            return f"Error: the arguments of {name} must be a JSON object, got {raw_args}", False
        try:
            result = tool.fn(args)
        except ValueError as e:  # ToolError and the tools' own input errors (CalculatorError, ...)
            return f"Error: {e}", False
        except Exception as e:  # a tool failing on arguments the model made up (a KeyError on a misspelt key):
            return f"Error: {name} failed: {type(e).__name__}: {e}", False  # the model sees it; the episode goes on
        # A tool message's content is text: a number or a dict a tool returned goes as its JSON.
        return (result if isinstance(result, str) else json.dumps(result, default=str)), True

    async def rollout(self, task: Task, client: ChatClient, key: str) -> Trajectory:
        messages: list[dict[str, Any]] = [dict(m) for m in task.prompt]
        steps: list[TrajectoryStep] = []
        truncated = answered = False
        num_tool_calls = tool_errors = 0
        for turn in range(self.max_turns):
            response = await client.chat([dict(m) for m in messages], tools=self.tools, key=f"{key}/turn-{turn}")
            message = assistant_message(response, turn)
            steps.append(make_step(messages, [message], response))
            messages.append(dict(message))
            calls = message.get("tool_calls", [])
            answered = not calls
            if response.finish_reason == "length":
                truncated = True  # a cut-off turn may hold half a tool call: do not build on it
                break
            if answered:
                break
            for call in calls:  # parallel calls: answered in the order the model made them
                result, ok = self.call_tool(call)
                num_tool_calls += 1
                tool_errors += not ok
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        reward: float = 0.0
        metrics: dict[str, float] = {}
        if answered:
            with reward_function(f"of environment {self.name!r}"):
                reward, metrics = self._score(answer_text(messages[-1]), task)
        return make_trajectory(
            env=self.name,
            task_id=task.id,
            steps=steps,
            tools=self.tools,
            reward=reward,
            metrics={
                "num_turns": float(len(steps)),
                "num_tool_calls": float(num_tool_calls),
                "tool_errors": float(tool_errors),
                "answered": float(answered),
                **metrics,
            },
            truncated=truncated,
        )
