"""Pure parts of the teacher client: request bodies, response normalisation, backoff, Retry-After, cache keys."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest

from apprentice.clients.cache import ResponseCache, cache_digest
from apprentice.clients.openai_client import OpenAIChatClient, TokenFieldsMissing, parse_completion
from apprentice.clients.ratelimit import RateLimiter, backoff_delay, parse_retry_after
from apprentice.config import EndpointConfig, SamplingConfig

ENDPOINT = EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_var="SOME_KEY")


def make(use_token_client: bool, **sampling: object) -> OpenAIChatClient:
    return OpenAIChatClient(ENDPOINT, SamplingConfig(**sampling), max_concurrency=1,  # type: ignore[arg-type]
                            use_token_client=use_token_client, cache_dir=None)  # fmt: skip


def test_teacher_body_has_only_hosted_api_fields() -> None:
    body = make(False, stop=["\n"], seed=1, temperature=0.7, top_p=0.9).build_request([{"role": "user", "content": "hi"}], None)
    assert set(body) == {"model", "messages", "temperature", "top_p", "max_tokens", "stop", "seed"}
    assert (body["temperature"], body["top_p"]) == (0.7, 0.9)
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert make(False).build_request([], tools)["tools"] == tools


def test_token_client_asks_for_logprobs_and_token_ids_and_extra_body_is_sent() -> None:
    body = make(True, extra_body={"top_k": 5}).build_request([], None)
    assert body["logprobs"] is True and body["return_token_ids"] is True and body["top_k"] == 5
    assert "stop" not in body and "seed" not in body


def test_parse_normalises_tool_calls_reasoning_and_content_parts() -> None:
    data = {"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant",
        "content": [{"type": "text", "text": "Let me "}, {"type": "text", "text": "compute."}],
        "reasoning": "2+2 is easy",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "calc", "arguments": {"x": 1}}},
                       {"id": "c2", "type": "function", "function": {"name": "calc", "arguments": '{"x": 2}'}}],
    }}]}  # fmt: skip
    r = parse_completion(data, use_token_client=False)
    assert r.finish_reason == "tool_calls"
    assert r.message["content"] == "Let me compute." and r.message["reasoning_content"] == "2+2 is easy"
    args = [c["function"]["arguments"] for c in r.message["tool_calls"]]
    assert args == ['{"x": 1}', '{"x": 2}'] and all(isinstance(json.loads(a), dict) for a in args)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"choices": []},
        {"choices": [{"message": "hi"}]},
        {"choices": [{"message": {"content": 3}}]},
        {"choices": [{"message": {"content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}}]},
        {"error": {"message": "overloaded"}},
    ],
)
def test_parse_rejects_malformed(data: object) -> None:
    with pytest.raises(ValueError):
        parse_completion(data, use_token_client=False)


def test_parse_token_fields() -> None:
    choice = {"message": {"content": "ab"}, "finish_reason": "stop", "token_ids": [5, 6],
              "logprobs": {"content": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.5}]}}  # fmt: skip
    r = parse_completion({"prompt_token_ids": [1, 2, 3], "choices": [choice]}, use_token_client=True)
    assert (r.prompt_ids, r.completion_ids, r.completion_logprobs) == ([1, 2, 3], [5, 6], [-0.5, -1.5])
    with pytest.raises(TokenFieldsMissing):
        parse_completion({"choices": [{"message": {"content": "ab"}}]}, use_token_client=True)


def test_backoff_is_bounded_and_grows() -> None:
    rng = random.Random(0)
    delays = [[backoff_delay(a, base_s=0.5, max_s=8.0, rng=rng) for _ in range(200)] for a in range(6)]
    assert all(0.0 <= d <= min(8.0, 0.5 * 2**a) for a, ds in enumerate(delays) for d in ds)
    assert max(delays[0]) <= 0.5 < max(delays[3])


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.25") == 0.25 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25.0 < parse_retry_after(future) <= 30.0  # type: ignore[operator]


def test_cache_keys_separate_samples_and_ignore_dict_order(tmp_path: Path) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0}
    reordered = dict(reversed(list(request.items())))
    assert cache_digest(request, "k") == cache_digest(reordered, "k")
    assert cache_digest(request, "k") != cache_digest(request, "k2")
    assert cache_digest(request, "k") != cache_digest({**request, "model": "other-teacher"}, "k")
    cache = ResponseCache(tmp_path)
    stored = {"message": {"content": "x"}, "finish_reason": "stop"}
    cache.put(request, "k", stored)
    assert cache.get(reordered, "k") == stored and cache.get(request, "k2") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_rate_limiter_spaces_starts() -> None:
    async def go() -> float:
        limiter = RateLimiter(50.0)
        start = time.monotonic()
        await asyncio.gather(*(limiter.acquire() for _ in range(6)))
        return time.monotonic() - start

    assert asyncio.run(go()) >= 5 / 50.0 * 0.9


def test_seed_is_derived_per_rollout_key() -> None:
    client = make(False, seed=7)
    seeds = {client.build_request([], None, key=f"task-0/sample-{i}")["seed"] for i in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**31 for s in seeds)
    assert client.build_request([], None, key="task-0/sample-0")["seed"] == make(False, seed=7).build_request(
        [], None, key="task-0/sample-0"
    )["seed"]
    assert client.build_request([], None)["seed"] == 7


def test_empty_answer_is_an_error_for_a_teacher_but_a_rollout_for_the_token_client() -> None:
    from apprentice.clients.openai_client import _SetAside

    choice = {"message": {"content": ""}, "finish_reason": "stop", "token_ids": [2],
              "logprobs": {"content": [{"token": "", "logprob": -0.1}]}}  # fmt: skip
    data = {"prompt_token_ids": [1], "choices": [choice]}
    with pytest.raises(_SetAside) as info:  # set aside (and cached) by chat(), raised as ClientError("empty")
        make(False)._parse(data)
    assert info.value.kind == "empty"
    response = make(True)._parse(data)
    assert response.completion_ids == [2] and make(True).metrics()["teacher/empty"] == 0


def test_cache_keeps_set_aside_verdicts_and_rejects_broken_ones(tmp_path: Path) -> None:
    request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    cache = ResponseCache(tmp_path)
    verdict = {"set_aside": {"kind": "empty", "message": "the teacher returned an empty answer"}, "usage": {"prompt_tokens": 3}}
    cache.put(request, "k", verdict)
    assert cache.get(request, "k") == verdict
    cache.put(request, "k", {"set_aside": {"kind": "empty"}})  # no message: not a verdict this client wrote
    assert cache.get(request, "k") is None
    cache.put(request, "k", {"message": {"content": "x"}, "finish_reason": "stop", "usage": 12})
    assert cache.get(request, "k") is None
