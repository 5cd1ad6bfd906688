"""Pure helpers of the built-in server: tool-call parsing and stop-string search."""

from __future__ import annotations

import json

from apprentice.inference.engine import _find_stop
from apprentice.inference.schema import ChatCompletionRequest, parse_tool_calls


def test_tool_calls_are_parsed_out_of_text() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "calc", "arguments": {"expression": "2 + 2"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    (call,) = calls
    assert call["type"] == "function" and call["id"].startswith("call-")
    assert call["function"]["name"] == "calc" and json.loads(call["function"]["arguments"]) == {"expression": "2 + 2"}


def test_two_calls_and_no_content() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": "{}"}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content is None and [c["function"]["name"] for c in calls] == ["a", "b"]


def test_malformed_call_stays_visible_as_content() -> None:
    text = '<tool_call>{"name": "a", "arguments": </tool_call>'
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls("plain answer") == ("plain answer", [])


def test_find_stop_earliest_and_only_in_new_text() -> None:
    assert _find_stop("abcXYdefXY", ["XY", "def"], 10) == 3
    assert _find_stop("abc", [], 3) is None
    assert _find_stop("hello wor", ["world"], 2) is None
    assert _find_stop("hello world", ["world"], 2) == 6


def test_request_schema_helpers() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "m", "stop": "END",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": "x", "refusal": None}],
    })  # fmt: skip
    assert req.stop_list() == ["END"]
    assert req.conversation()[0] == {"role": "user", "content": "ab"}


def test_conversation_hands_tool_call_arguments_over_parsed_as_vllm_does() -> None:
    """A tool-using history reaches the template as vLLM hands it over: Qwen2.5's real template prints the parsed
    object with its own `tojson` spacing (not the client's compact string, not a double-encoded string), and
    arguments that are not a JSON object render as `{}`."""
    from pathlib import Path

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = (Path(__file__).parents[1] / "fixtures/templates/Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    calls = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Zürich","forecast":true}'}},
             {"id": "c2", "type": "function", "function": {"name": "clock", "arguments": "not json"}}]  # fmt: skip
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]})  # fmt: skip
    conversation = req.conversation()
    assert [c["function"]["arguments"] for c in conversation[1]["tool_calls"]] == [{"city": "Zürich", "forecast": True}, {}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, **kw: json.dumps(v, ensure_ascii=False, **kw)
    text = env.from_string(template).render(messages=conversation, add_generation_prompt=True)
    assert '"arguments": {"city": "Zürich", "forecast": true}' in text
    assert '"arguments": {}' in text
    assert '\\"city\\"' not in text and '"city":"Zürich"' not in text
    assert calls[0]["function"]["arguments"] == '{"city":"Zürich","forecast":true}'  # the request is not mutated
