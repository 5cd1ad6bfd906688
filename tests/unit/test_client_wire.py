"""Request bodies as hosted APIs want them, and the checks that set a teacher's answer aside."""

from __future__ import annotations

import json

import pytest

from apprentice.clients.base import ChatResponse, Usage
from apprentice.clients.openai_client import OpenAIChatClient, parse_completion
from apprentice.clients.parse import Unusable, check_size, check_text, decode_body
from apprentice.clients.wire import invalid_tool_calls, prompt_cache_key, wire_message
from apprentice.config import EndpointConfig, SamplingConfig
from apprentice.render.reasoning import split_think

HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def client(use_token_client: bool = False, endpoint: dict[str, object] | None = None, **sampling: object) -> OpenAIChatClient:
    ep = EndpointConfig.model_validate({"base_url": "http://127.0.0.1:9/v1", "model": "m", **(endpoint or {})})
    return OpenAIChatClient(ep, SamplingConfig.model_validate(sampling), max_concurrency=1,
                            use_token_client=use_token_client, cache_dir=None)  # fmt: skip


def test_unset_sampling_fields_are_not_sent_and_the_token_limit_field_is_chosen() -> None:
    body = client().build_request(HI, None)
    assert set(body) == {"model", "messages", "max_tokens"}
    body = client(max_tokens=64, max_tokens_field="max_completion_tokens").build_request(HI, None)
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body
    body = client(temperature=0.0).build_request(HI, None)
    assert body["temperature"] == 0.0 and "top_p" not in body  # 0.0 is a value, not "unset"
    # The token client (rl mode) always pins the distribution the trainer's ratios assume.
    body = client(True).build_request(HI, None)
    assert (body["temperature"], body["top_p"]) == (1.0, 1.0)


def test_request_tags_only_when_enabled_and_stable_per_prompt() -> None:
    assert not {"user", "prompt_cache_key"} & set(client().build_request(HI, None))
    tagged = client(endpoint={"prompt_cache_key": True, "user": "apprentice-distill"})
    first = tagged.build_request(HI, None, key="step1/t/sample0/turn-0")
    later = tagged.build_request([*HI, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], None, key="step9/t/sample3/turn-1")
    assert first["user"] == "apprentice-distill"
    assert first["prompt_cache_key"] == later["prompt_cache_key"] == prompt_cache_key(HI)
    assert prompt_cache_key([{"role": "user", "content": "other"}]) != first["prompt_cache_key"]


@pytest.mark.parametrize(
    "raw",
    [
        {"content": "Paris.", "reasoning_content": "Capital of France."},  # DeepSeek, vLLM
        {"content": "Paris.", "reasoning": "Capital of France."},  # OpenRouter, newer vLLM
        {"content": "<think>\nCapital of France.\n</think>\n\nParis."},  # inline think block
        {"content": "Capital of France.\n</think>\n\nParis."},  # the template opened <think> in the prompt
    ],
)
def test_every_reasoning_shape_reaches_the_message_the_same_way(raw: dict[str, str]) -> None:
    r = parse_completion({"choices": [{"message": {"role": "assistant", **raw}, "finish_reason": "stop"}]}, use_token_client=False)
    assert r.message == {"role": "assistant", "content": "Paris.", "reasoning_content": "Capital of France."}


def test_split_think_edges() -> None:
    # The client splits inline reasoning with render's one definition (render.reasoning.split_think).
    assert split_think("<think>cut off by max_tok") == ("cut off by max_tok", "", False)
    assert split_think("no reasoning here") == (None, "no reasoning here", True)
    assert split_think("Answer first <think>x</think> then") == (None, "Answer first <think>x</think> then", True)
    assert split_think("<think></think>\n\nA") == ("", "A", True)


def test_lone_surrogate_and_invalid_utf8_are_invalid_text() -> None:
    data = decode_body(b'{"choices": [{"message": {"content": "ab\\ud800cd"}, "finish_reason": "stop"}]}')
    r = parse_completion(data, use_token_client=False)
    with pytest.raises(Unusable) as info:
        check_text(r.message)
    assert info.value.kind == "invalid_text" and "message.content" in str(info.value)
    with pytest.raises(Unusable) as info:
        decode_body(b'{"choices": [{"message": {"content": "ab\xff\xfecd"}}]}')
    assert info.value.kind == "invalid_text"
    check_text({"content": "caf\u00e9 \U0001f600"})  # real non-ASCII text is fine


def test_oversized_by_usage_or_by_text() -> None:
    small = ChatResponse({"role": "assistant", "content": "word " * 20}, "stop")
    check_size(small, 32, max_tokens=32, tolerance=0.25)
    with pytest.raises(Unusable) as info:
        check_size(small, 4076, max_tokens=32, tolerance=0.25)
    assert info.value.kind == "oversized" and "4076" in str(info.value)
    huge = ChatResponse({"role": "assistant", "content": "x" * 2_000_000}, "unknown")
    with pytest.raises(Unusable):
        check_size(huge, 0, max_tokens=32, tolerance=0.25)  # usage missing: the text length gives it away


def test_broken_tool_call_arguments_are_sent_as_a_json_object_and_counted() -> None:
    call = {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": "{expression: 2+2"}}
    good = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "1"}'}}
    message = {"role": "assistant", "content": None, "tool_calls": [call, good], "reasoning_content": "r"}
    sent = wire_message(message)
    args = [json.loads(c["function"]["arguments"]) for c in sent["tool_calls"]]
    assert args == [{"invalid_json": "{expression: 2+2"}, {"expression": "1"}]
    assert "reasoning_content" not in sent and message["tool_calls"][0] is call  # the trajectory keeps the original
    trajectory = {"steps": [{"prompt": [], "completion": [message]}]}
    assert invalid_tool_calls(trajectory) == 1
    assert invalid_tool_calls({"steps": [{"prompt": [], "completion": [{"role": "assistant", "tool_calls": [good]}]}]}) == 0
    non_object = {**good, "function": {"name": "calculator", "arguments": "[1, 2]"}}
    assert invalid_tool_calls({"steps": [{"completion": [{"tool_calls": [non_object]}]}]}) == 1


def test_usage_reads_reasoning_and_cached_tokens_and_ignores_garbage() -> None:
    usage = Usage.from_json({"prompt_tokens": 10, "completion_tokens": 30, "completion_tokens_details": {"reasoning_tokens": 20},
                             "prompt_tokens_details": {"cached_tokens": 8}})  # fmt: skip
    assert usage == Usage(10, 30, 20, 8)
    assert Usage.from_json({"prompt_tokens": "many", "completion_tokens": -3}) == Usage() == Usage.from_json(None)
