"""The teacher client against a real fault-injecting HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from fault_teacher import Fault, FaultTeacher

from apprentice.clients.base import ChatResponse, ClientError, TeacherAuthError, Usage
from apprentice.clients.openai_client import OpenAIChatClient
from apprentice.config import EndpointConfig, SamplingConfig

KEY_VAR = "APPRENTICE_TEST_TEACHER_KEY"
SECRET = "sk-test-0123456789abcdef"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


def make_client(
    teacher: FaultTeacher,
    *,
    cache_dir: Path | None = None,
    max_retries: int = 4,
    timeout_s: float = 5.0,
    rate: float | None = None,
    concurrency: int = 8,
    **sampling: Any,
) -> OpenAIChatClient:
    endpoint = EndpointConfig(
        base_url=teacher.base_url,
        model="teacher-model",
        api_key_var=KEY_VAR,
        headers={"X-Team": "apprentice-tests"},
        timeout_s=timeout_s,
        max_retries=max_retries,
        max_requests_per_s=rate,
    )
    return OpenAIChatClient(
        endpoint,
        SamplingConfig(temperature=0.7, max_tokens=32, **sampling),
        max_concurrency=concurrency,
        use_token_client=False,
        cache_dir=cache_dir,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        jitter_seed=0,
    )


def chats(client: OpenAIChatClient, keys: list[str], messages: list[dict[str, Any]] = MESSAGES, **kwargs: Any) -> list[ChatResponse]:
    """One event loop for the client's whole life (it is bound to the loop it first ran on), one call per key."""

    async def go() -> list[ChatResponse]:
        try:
            return [await client.chat(messages, key=key, **kwargs) for key in keys]
        finally:
            await client.aclose()

    return asyncio.run(go())


def chat(client: OpenAIChatClient, key: str = "k0", **kwargs: Any) -> ChatResponse:
    return chats(client, [key], **kwargs)[0]


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(KEY_VAR, SECRET)
    with FaultTeacher(api_key=SECRET) as t:
        yield t


def test_plain_request_sends_only_openai_fields_key_and_headers(teacher: FaultTeacher) -> None:
    client = make_client(teacher, stop=["\n\n"], seed=3)
    response = chat(client)
    assert response.message == {"role": "assistant", "content": "echo: hello world"}
    assert response.finish_reason == "stop" and not response.cached and response.completion_ids is None
    (request,) = teacher.chat_requests()
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    assert request.headers["x-team"] == "apprentice-tests"
    assert request.body is not None
    assert set(request.body) == {"model", "messages", "temperature", "max_tokens", "stop", "seed"}  # top_p unset: not sent
    assert request.body["messages"] == MESSAGES and request.body["stop"] == ["\n\n"]
    assert teacher.unknown_fields() == [] and teacher.token_fields() == []
    m = client.metrics()
    assert m["teacher/requests"] == 1 and m["teacher/retries"] == 0 and m["teacher/cache_hits"] == 0
    assert m["teacher/prompt_tokens"] > 0 and m["teacher/latency_s"] > 0
    assert response.usage is not None and response.usage.prompt_tokens == m["teacher/prompt_tokens"]


def test_retries_429_with_retry_after_then_5xx_drop_malformed_timeout(teacher: FaultTeacher) -> None:
    teacher.push(
        Fault.rate_limit(retry_after=0.3),
        Fault.server_error(503),
        Fault.drop(),
        Fault.malformed(),
        Fault.slow(2.0),
    )
    client = make_client(teacher, max_retries=5, timeout_s=0.5)
    start = time.monotonic()
    response = chat(client)
    elapsed = time.monotonic() - start
    assert response.message["content"] == "echo: hello world"
    assert len(teacher.chat_requests()) == 6
    # Retry-After (0.3 s) is honoured although our own backoff is capped at 0.05 s; the slow attempt costs 0.5 s.
    assert elapsed >= 0.3 + 0.5
    m = client.metrics()
    assert m["teacher/requests"] == 6 and m["teacher/retries"] == 5
    for kind in ("rate_limit", "server", "connection", "malformed", "timeout"):
        assert m[f"teacher/retries/{kind}"] == 1, kind
    assert not any(k.startswith("teacher/errors/") for k in m)


def test_gives_up_after_max_retries(teacher: FaultTeacher) -> None:
    teacher.push(*[Fault.server_error(500)] * 3)
    client = make_client(teacher, max_retries=2)
    with pytest.raises(ClientError) as info:
        chat(client)
    assert info.value.kind == "server" and "3 attempts" in str(info.value)
    assert len(teacher.chat_requests()) == 3
    assert client.metrics()["teacher/errors/server"] == 1


def test_400_is_not_retried_and_carries_the_server_message(teacher: FaultTeacher) -> None:
    teacher.push(Fault.bad_request("'messages' is too long for this model."))
    client = make_client(teacher)
    with pytest.raises(ClientError) as info:
        chat(client)
    assert info.value.kind == "bad_request" and "too long for this model" in str(info.value)
    assert len(teacher.chat_requests()) == 1
    assert client.metrics()["teacher/errors/bad_request"] == 1


def test_strict_server_rejects_extra_body_field_and_client_reports_it(teacher: FaultTeacher) -> None:
    client = make_client(teacher, extra_body={"top_k": 20})
    with pytest.raises(ClientError) as info:
        chat(client)
    assert info.value.kind == "bad_request" and "top_k" in str(info.value)
    assert teacher.unknown_fields() == ["top_k"]


def test_missing_key_variable_names_it_and_sends_nothing(teacher: FaultTeacher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_VAR)
    client = make_client(teacher)
    with pytest.raises(TeacherAuthError) as info:
        chat(client)
    assert info.value.exit_code == 1 and KEY_VAR in str(info.value)
    assert teacher.chat_requests() == []


def test_wrong_key_is_auth_error_and_key_is_read_at_request_time(
    teacher: FaultTeacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = make_client(teacher)
    monkeypatch.setenv(KEY_VAR, "sk-wrong")
    with pytest.raises(TeacherAuthError) as info:
        chat(client)
    assert KEY_VAR in str(info.value) and "HTTP 401" in str(info.value) and "sk-wrong" not in str(info.value)
    assert len(teacher.chat_requests()) == 1  # not retried
    assert client.metrics()["teacher/errors/auth"] == 1


def test_empty_truncated_and_tool_call_responses_are_classified(teacher: FaultTeacher) -> None:
    teacher.push(Fault.empty())
    client = make_client(teacher)
    with pytest.raises(ClientError) as info:
        chat(client)
    assert info.value.kind == "empty" and len(teacher.chat_requests()) == 1

    teacher.push(Fault.truncated())
    client = make_client(teacher)
    response = chat(client)
    assert response.finish_reason == "length" and client.metrics()["teacher/truncated"] == 1

    teacher.push(Fault.call_tool("calculator", {"expression": "2 + 2"}))
    client = make_client(teacher)
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    response = chat(client, tools=tools)
    assert response.finish_reason == "tool_calls" and response.message["content"] is None
    (call,) = response.message["tool_calls"]
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "2 + 2"}'}
    assert teacher.chat_requests()[-1].body["tools"] == tools  # type: ignore[index]


def test_cache_hits_across_client_instances_and_no_secret_on_disk(teacher: FaultTeacher, tmp_path: Path) -> None:
    cache_dir = tmp_path / "teacher_cache"
    first = make_client(teacher, cache_dir=cache_dir)
    # Same prompt, two samples: two distinct entries, two real requests.
    a0, a1 = chats(first, ["task-1/sample-0", "task-1/sample-1"])
    assert len(teacher.chat_requests()) == 2

    second = make_client(teacher, cache_dir=cache_dir)  # a resumed run
    b0, b1 = chats(second, ["task-1/sample-0", "task-1/sample-1"])
    assert len(teacher.chat_requests()) == 2
    assert b0.cached and b1.cached and b0.message == a0.message and b1.message == a1.message
    m = second.metrics()
    assert m["teacher/cache_hits"] == 2 and m["teacher/requests"] == 0

    files = sorted(p for p in cache_dir.rglob("*") if p.is_file())
    assert len(files) == 2
    for path in files:
        rel = path.relative_to(cache_dir).parts
        assert len(rel) == 3 and rel[2].startswith(rel[0] + rel[1])  # ab/cd/abcd....json
        text = path.read_text()
        assert SECRET not in text and KEY_VAR not in text
        assert json.loads(text)["request"]["messages"] == MESSAGES


def test_rate_limit_spaces_request_starts(teacher: FaultTeacher) -> None:
    client = make_client(teacher, rate=20.0)

    async def go() -> None:
        try:
            await asyncio.gather(*(client.chat(MESSAGES, key=f"k{i}") for i in range(5)))
        finally:
            await client.aclose()

    start = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - start >= 4 / 20.0 * 0.9
    assert len(teacher.chat_requests()) == 5


def test_concurrency_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    active = 0
    peak = 0
    import threading

    lock = threading.Lock()

    def respond(body: dict[str, Any]) -> str:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        with lock:
            active -= 1
        return "ok"

    with FaultTeacher(api_key=SECRET, respond=respond) as teacher:
        client = make_client(teacher, concurrency=2)

        async def go() -> None:
            try:
                await asyncio.gather(*(client.chat(MESSAGES, key=f"k{i}") for i in range(6)))
            finally:
                await client.aclose()

        asyncio.run(go())
    assert peak == 2


def test_no_key_variable_sends_no_authorization_header() -> None:
    with FaultTeacher() as teacher:
        endpoint = EndpointConfig(base_url=teacher.base_url, model="m", max_retries=0)
        client = OpenAIChatClient(endpoint, SamplingConfig(), max_concurrency=1, use_token_client=False, cache_dir=None)
        assert chat(client).message["content"] == "echo: hello world"
        (request,) = teacher.chat_requests()
    assert "authorization" not in request.headers


def test_earlier_turns_reasoning_stays_out_of_teacher_requests(teacher: FaultTeacher) -> None:
    """Trajectories keep the teacher's reasoning for training; strict APIs reject it as a request field."""
    history = [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hi", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "hello again"},
    ]
    response = chat(make_client(teacher), messages=history)
    assert response.message["content"] == "echo: hello again"
    (request,) = teacher.chat_requests()
    assert request.body is not None
    assert request.body["messages"][1] == {"role": "assistant", "content": "hi"}
    assert history[1]["reasoning_content"] == "The user greets me."  # the caller's trajectory is untouched


def test_answers_paid_for_but_unusable_are_charged(teacher: FaultTeacher) -> None:
    """Every answer the endpoint returned was billed: one retried as malformed (JSON without choices) adds to the
    usage of the answer that follows it; one refused for an absurd logprob carries its usage on the ClientError."""
    plain = chat(make_client(teacher), key="plain").usage
    assert plain is not None and plain.prompt_tokens > 0
    teacher.push(Fault.raw(json.dumps({"object": "chat.completion", "usage": {"prompt_tokens": 11, "completion_tokens": 3}}).encode()))
    client = make_client(teacher)
    response = chat(client, key="retried")
    assert response.usage == plain + Usage(11, 3)
    m = client.metrics()
    assert m["teacher/retries/malformed"] == 1 and m["teacher/prompt_tokens"] == plain.prompt_tokens + 11

    absurd = {"content": [{"token": "hi", "logprob": -1e30, "bytes": [104, 105], "top_logprobs": []}]}
    teacher.push(Fault.raw(json.dumps({
        "object": "chat.completion", "usage": {"prompt_tokens": 7, "completion_tokens": 1},
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop", "logprobs": absurd}],
    }).encode()))  # fmt: skip
    client = make_client(teacher, top_logprobs=2)
    with pytest.raises(ClientError) as info:
        chat(client, key="absurd")
    assert info.value.kind == "absurd_logprob" and info.value.usage == Usage(7, 1)
    assert client.metrics()["teacher/prompt_tokens"] == 7
