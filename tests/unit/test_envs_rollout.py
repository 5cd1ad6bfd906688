"""Rollouts of the built-in environments against a scripted chat client: trajectory shape, prompt growth, tool
messages, rewards, and a render of a tool-calculator conversation through a real chat template."""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest

from apprentice.clients.base import ChatResponse
from apprentice.config import EnvConfig
from apprentice.envs.calculator import CALCULATOR_TOOL
from apprentice.envs.registry import load_environment
from apprentice.testing.tiny import build_tiny_tokenizer

TRAJECTORY_KEYS = {"steps", "tools", "reward", "metrics", "error", "task_id", "env", "truncated"}


class ScriptedClient:
    """A ChatClient that returns canned responses in order and records every call (a stand-in for a hosted API)."""

    def __init__(self, responses: list[ChatResponse]) -> None:
        self.responses = list(responses)
        self.calls: list[dict[str, Any]] = []

    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse:
        self.calls.append({"messages": copy.deepcopy(messages), "tools": tools, "key": key})
        if not self.responses:
            raise AssertionError("the environment asked for more turns than scripted")
        return self.responses.pop(0)


def reply(content: str | None, finish_reason: str = "stop", **extra: Any) -> ChatResponse:
    return ChatResponse(message={"role": "assistant", "content": content, **extra}, finish_reason=finish_reason)


def calls(*specs: tuple[str | None, str, Any]) -> ChatResponse:
    """A tool-calling turn; each spec is (id or None, tool name, arguments as a JSON string or a dict)."""
    tool_calls = [
        {"type": "function", "function": {"name": name, "arguments": args}} | ({"id": cid} if cid else {})
        for cid, name, args in specs
    ]
    return ChatResponse(
        message={"role": "assistant", "content": None, "tool_calls": tool_calls}, finish_reason="tool_calls"
    )


def run(env: Any, task: Any, client: ScriptedClient, key: str = "reverse/0/s0") -> dict[str, Any]:
    return asyncio.run(env.rollout(task, client, key))


def test_reverse_text_rollout_shape_and_reward() -> None:
    env = load_environment(EnvConfig(id="reverse-text", args={"num_tasks": 4, "num_eval_tasks": 2}), seed=3)
    task = env.tasks("train")[0]
    client = ScriptedClient([reply(f' "{task.answer}" ', refusal=None, annotations=[])])
    traj = run(env, task, client)
    assert set(traj) == TRAJECTORY_KEYS
    assert traj["reward"] == 1.0 and traj["metrics"] == {"num_turns": 1.0, "exact": 1.0}
    assert traj["env"] == "reverse-text" and traj["task_id"] == task.id and traj["tools"] is None
    assert traj["error"] is None and traj["truncated"] is False
    [step] = traj["steps"]
    assert step["prompt"] == task.prompt and "tokens" not in step
    # Provider extras (refusal, annotations) are not part of the stored conversation.
    assert step["completion"] == [{"role": "assistant", "content": f' "{task.answer}" '}]
    assert client.calls == [{"messages": task.prompt, "tools": None, "key": "reverse/0/s0/turn-0"}]


def test_reverse_text_partial_credit_and_truncation() -> None:
    env = load_environment(EnvConfig(id="reverse-text", args={"num_tasks": 2, "min_len": 8, "max_len": 8}))
    task = env.tasks("train")[0]
    wrong_last = task.answer[:-1] + ("a" if task.answer[-1] != "a" else "b")
    traj = run(env, task, ScriptedClient([reply(wrong_last, finish_reason="length")]))
    assert traj["reward"] == pytest.approx(7 / 8)
    assert traj["metrics"]["exact"] == 0.0
    assert traj["truncated"] is True


def test_token_fields_only_when_the_server_sends_them() -> None:
    env = load_environment(EnvConfig(id="reverse-text", args={"num_tasks": 1, "num_eval_tasks": 0}))
    task = env.tasks("train")[0]
    response = reply("x")
    response.prompt_ids, response.completion_ids, response.completion_logprobs = [1, 2, 3], [4, 5], [-0.5, -0.1]
    step = run(env, task, ScriptedClient([response]))["steps"][0]
    assert step["tokens"] == {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "completion_logprobs": [-0.5, -0.1]}


def test_prompts_rollout_scores_against_answer(tmp_path: Any) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    env = load_environment(EnvConfig(id="prompts", args={"path": str(path), "reward": "contains"}))
    task = env.tasks("train")[0]
    assert run(env, task, ScriptedClient([reply("<think>Lyon? no.</think>It is paris.")]))["reward"] == 1.0
    # The reasoning is not the answer: a correct word inside <think> earns nothing.
    assert run(env, task, ScriptedClient([reply("<think>Paris</think>Lyon")]))["reward"] == 0.0


def _calculator(max_turns: int = 4) -> tuple[Any, Any]:
    env = load_environment(
        EnvConfig(id="tool-calculator", args={"num_tasks": 3, "num_eval_tasks": 1, "max_turns": max_turns}), seed=1
    )
    return env, env.tasks("train")[0]


def test_tool_calculator_multi_turn_trajectory() -> None:
    env, task = _calculator()
    expr = task.info["expression"]
    client = ScriptedClient(
        [
            # Turn 0: two parallel calls, one with broken JSON arguments.
            calls(("c1", "calculator", json.dumps({"expression": expr})), ("c2", "calculator", "{expression: 1+")),
            # Turn 1: an unknown tool, dict arguments, and a call without an id (some local servers omit it).
            calls(("c3", "web_search", "{}"), (None, "calculator", {"expression": "2 * 21"})),
            reply(f"The answer is {task.answer}."),
        ]
    )
    traj = run(env, task, client, key="calc/0/s0")
    assert set(traj) == TRAJECTORY_KEYS
    assert traj["tools"] == [CALCULATOR_TOOL]
    assert traj["reward"] == 1.0 and traj["truncated"] is False
    assert traj["metrics"] == {"num_turns": 3.0, "num_tool_calls": 4.0, "tool_errors": 2.0, "answered": 1.0}
    s0, s1, s2 = traj["steps"]
    assert s0["prompt"] == task.prompt

    tool_msgs_0 = s1["prompt"][len(s0["prompt"]) + 1 :]
    assert s1["prompt"] == s0["prompt"] + s0["completion"] + tool_msgs_0
    assert [m["tool_call_id"] for m in tool_msgs_0] == ["c1", "c2"]
    assert all(m["role"] == "tool" for m in tool_msgs_0)
    assert tool_msgs_0[0]["content"] == str(task.answer)
    assert tool_msgs_0[1]["content"].startswith("Error: the arguments of calculator are not valid JSON")

    assistant_1 = s1["completion"][0]
    assert assistant_1["content"] is None
    assert assistant_1["tool_calls"][1]["id"] == "call_1_1"  # generated, and the tool message points at it
    assert assistant_1["tool_calls"][1]["function"]["arguments"] == '{"expression": "2 * 21"}'
    tool_msgs_1 = s2["prompt"][len(s1["prompt"]) + 1 :]
    assert s2["prompt"] == s1["prompt"] + s1["completion"] + tool_msgs_1
    assert tool_msgs_1 == [
        {
            "role": "tool",
            "tool_call_id": "c3",
            "content": "Error: unknown tool 'web_search'; available tools: calculator",
        },
        {"role": "tool", "tool_call_id": "call_1_1", "content": "42"},
    ]
    assert s2["completion"] == [{"role": "assistant", "content": f"The answer is {task.answer}."}]
    # What the model was sent is exactly each step's prompt, with the tools, under per-turn keys.
    assert [c["messages"] for c in client.calls] == [s["prompt"] for s in traj["steps"]]
    assert {json.dumps(c["tools"]) for c in client.calls} == {json.dumps([CALCULATOR_TOOL])}
    assert [c["key"] for c in client.calls] == ["calc/0/s0/turn-0", "calc/0/s0/turn-1", "calc/0/s0/turn-2"]


def test_tool_calculator_wrong_answer_and_max_turns() -> None:
    env, task = _calculator(max_turns=2)
    wrong = task.answer + 1
    assert run(env, task, ScriptedClient([reply(f"It is {wrong}")]))["reward"] == 0.0
    looping = ScriptedClient([calls(("a", "calculator", '{"expression": "1+1"}'))] * 2)
    traj = run(env, task, looping)
    assert len(traj["steps"]) == 2 and len(looping.calls) == 2
    assert traj["reward"] == 0.0 and traj["metrics"]["answered"] == 0.0
    # A turn cut off by max_tokens ends the episode: nothing is built on a half-written call.
    cut = ScriptedClient(
        [ChatResponse(message={"role": "assistant", "content": "<tool_call>\n{"}, finish_reason="length")]
    )
    traj = run(env, task, cut)
    assert traj["truncated"] is True and len(traj["steps"]) == 1


def test_tool_calculator_conversation_renders_with_a_chat_template() -> None:
    env, task = _calculator()
    client = ScriptedClient(
        [
            calls(("c1", "calculator", json.dumps({"expression": task.info["expression"]}))),
            reply(f"{task.answer}"),
        ]
    )
    traj = run(env, task, client)
    last = traj["steps"][-1]
    conversation = last["prompt"] + last["completion"]
    tokenizer = build_tiny_tokenizer()
    text = tokenizer.apply_chat_template(conversation, tools=traj["tools"], tokenize=False)
    assert isinstance(text, str)
    assert '"name": "calculator"' in text  # the tool schema in the system turn
    assert (
        f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{task.info["expression"]}"}}}}\n</tool_call>'
        in text
    )
    assert f"<|im_start|>tool\n{task.answer}<|im_end|>" in text
    assert text.endswith(f"<|im_start|>assistant\n{task.answer}<|im_end|>\n")
    ids = tokenizer.apply_chat_template(conversation, tools=traj["tools"], tokenize=True)
    assert len(ids) > 0


def test_one_tool_call_normaliser_fills_ids_serialises_arguments_and_refuses_nameless_calls() -> None:
    from apprentice.trajectory import normalize_tool_call

    call = normalize_tool_call({"function": {"name": "calc", "arguments": {"x": "é"}}}, "call_0_0")
    assert call == {"id": "call_0_0", "type": "function", "function": {"name": "calc", "arguments": '{"x": "é"}'}}
    assert normalize_tool_call({"id": "c9", "function": {"name": "f"}}, "unused")["function"]["arguments"] == "{}"
    assert normalize_tool_call({"id": "c9", "function": {"name": "f", "arguments": "{}"}}, "unused")["id"] == "c9"
    for broken in ({"function": {"arguments": "{}"}}, {"id": "c1"}, {"function": {"name": ""}}):
        with pytest.raises(ValueError, match="tool call without"):
            normalize_tool_call(broken, "call_0_0")


def test_a_tool_that_fails_on_made_up_arguments_answers_an_error_and_a_non_text_result_goes_as_json() -> None:
    """A tool doing args["key"] raised KeyError when the model misspelt the key: the exception left the rollout and
    the producer stopped the whole run. Now the model reads the error and the episode goes on; an int result went
    into the tool message as a number (not text)."""
    from apprentice.envs.base import Task
    from apprentice.envs.tool_env import Tool, ToolEnv

    def lookup(args: dict[str, Any]) -> Any:
        return {"celsius": 21} if args["city"] == "Paris" else 42

    schema = {"type": "function", "function": {"name": "lookup", "description": "d", "parameters": {"type": "object"}}}
    env = ToolEnv("t", [Task(id="0", prompt=[{"role": "user", "content": "?"}])], [], [Tool(schema, lookup)],
                  lambda text, task: (0.0, {}), max_turns=2)  # fmt: skip

    def call(arguments: str) -> tuple[str, bool]:
        return env.call_tool({"id": "c", "type": "function", "function": {"name": "lookup", "arguments": arguments}})

    assert call('{"citty": "Paris"}') == ("Error: lookup failed: KeyError: 'city'", False)
    assert call('{"city": "Paris"}') == ('{"celsius": 21}', True)
    assert call('{"city": "Rome"}') == ("42", True)
