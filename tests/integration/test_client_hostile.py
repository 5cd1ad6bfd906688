"""A hostile or broken teacher on loopback cannot crash, stall, flood or poison the client; each case is counted."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from fault_teacher import Fault, FaultTeacher
from test_client_faults import KEY_VAR, MESSAGES, SECRET, chat, chats, make_client

from apprentice.clients import session
from apprentice.clients.base import ClientError, TeacherAuthError, Usage

BROKEN_CALL = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": "{expression: 2 + 2"}}]},
    {"role": "tool", "tool_call_id": "c0", "content": "Error: the arguments of calculator are not valid JSON"},
]  # fmt: skip


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(KEY_VAR, SECRET)
    with FaultTeacher(api_key=SECRET) as t:
        yield t


def fails(client: Any, kind: str, **kwargs: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        chat(client, **kwargs)
    assert info.value.kind == kind, str(info.value)
    return info.value


def test_lone_surrogate_is_set_aside_cached_and_never_crashes_the_cache(teacher: FaultTeacher, tmp_path: Path) -> None:
    teacher.push(Fault.reply({"content": "ab\ud800cd"}))
    client = make_client(teacher, cache_dir=tmp_path)
    error = fails(client, "invalid_text")
    assert "lone surrogate" in str(error) and error.usage is not None and error.usage.completion_tokens > 0
    assert client.metrics()["teacher/errors/invalid_text"] == 1
    (entry,) = [p for p in tmp_path.rglob("*.json")]
    assert json.loads(entry.read_text(encoding="utf-8"))["response"]["set_aside"]["kind"] == "invalid_text"
    resumed = make_client(teacher, cache_dir=tmp_path)
    fails(resumed, "invalid_text")  # from the cache: a resumed run does not pay for it again
    assert len(teacher.chat_requests()) == 1 and resumed.metrics()["teacher/cache_hits"] == 1


def test_invalid_utf8_is_set_aside_not_replaced_and_not_retried(teacher: FaultTeacher) -> None:
    teacher.push(Fault.raw(b'{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ab\xff\xfecd"}}]}'))
    client = make_client(teacher)
    assert "not UTF-8" in str(fails(client, "invalid_text"))
    assert len(teacher.chat_requests()) == 1


@pytest.mark.parametrize("declare_length", [True, False])
def test_a_50_mb_answer_is_cut_off_at_the_byte_cap(teacher: FaultTeacher, declare_length: bool) -> None:
    teacher.push(Fault.huge(50_000_000, declare_length=declare_length))
    client = make_client(teacher, max_retries=0)
    client.max_response_bytes = 1 << 20
    tracemalloc.start()
    try:
        error = fails(client, "oversized")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "larger than 1048576 bytes" in str(error)
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # the whole answer would be 50 MB (200 MB with copies)
    assert teacher.bytes_sent < 20 * 2**20  # the client hung up instead of draining the answer


def test_answers_that_ignore_max_tokens_are_oversized_by_usage_or_by_length(teacher: FaultTeacher, tmp_path: Path) -> None:
    teacher.push(Fault.reply({"content": "word " * 20}, usage={"prompt_tokens": 5, "completion_tokens": 4076}, finish_reason=""))
    client = make_client(teacher, cache_dir=tmp_path)  # max_tokens = 32
    error = fails(client, "oversized")
    assert "4076" in str(error) and error.usage == Usage(prompt_tokens=5, completion_tokens=4076)
    teacher.push(Fault.huge(2_000_000))  # under the default byte cap (4 MiB + 1 KiB per max_tokens), no usage
    client = make_client(teacher, cache_dir=tmp_path)
    assert "characters" in str(fails(client, "oversized", key="k1"))
    m = client.metrics()
    assert m["teacher/errors/oversized"] == 1 and "teacher/responses" not in m
    # Nothing of the answer is written: the cache holds only the verdict.
    assert max(p.stat().st_size for p in tmp_path.rglob("*.json")) < 4096


def test_total_deadline_per_request_not_per_read(teacher: FaultTeacher) -> None:
    """Headers, then one byte every 0.25 s: a per-read timeout of 0.6 s never fires; the total deadline does."""
    teacher.push(Fault.drip(0.25), Fault.drip(0.25))
    client = make_client(teacher, max_retries=1, timeout_s=0.6)
    start = time.monotonic()
    error = fails(client, "timeout")
    elapsed = time.monotonic() - start
    assert "total deadline" in str(error) and "2 attempts" in str(error)
    assert 1.2 <= elapsed < 3.0, elapsed
    assert client.metrics()["teacher/retries/timeout"] == 1


def test_retry_after_beyond_the_cap_gives_up_and_long_waits_are_logged(
    teacher: FaultTeacher, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    teacher.push(Fault.rate_limit(retry_after=864_000))  # ten days
    client = make_client(teacher)
    start = time.monotonic()
    error = fails(client, "rate_limit")
    assert time.monotonic() - start < 2.0 and "864000 s" in str(error) and "max_retry_after_s" in str(error)
    assert len(teacher.chat_requests()) == 1 and client.metrics()["teacher/errors/rate_limit"] == 1

    monkeypatch.setattr(session, "_LONG_WAIT_S", 0.2)  # the retry policy lives in clients/session.py
    teacher.push(Fault.rate_limit(retry_after=0.3))
    with caplog.at_level(logging.WARNING, logger="apprentice.teacher"):
        assert chat(make_client(teacher)).message["content"] == "echo: hello world"
    (line,) = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert "HTTP 429" in line and "retry 1 of 4" in line


def test_403_stops_with_the_variable_named_and_other_4xx_are_counted(teacher: FaultTeacher) -> None:
    teacher.push(Fault("status", status=403, message=f"Key {SECRET} has no access to this model."))
    client = make_client(teacher)
    with pytest.raises(TeacherAuthError) as info:
        chat(client)
    assert KEY_VAR in str(info.value) and SECRET not in str(info.value) and "[API key]" in str(info.value)
    teacher.push(Fault("status", status=404, message="The model does not exist."))
    client = make_client(teacher)
    fails(client, "not_found")
    assert client.metrics()["teacher/errors/not_found"] == 1 and len(teacher.chat_requests()) == 2


def test_llama_cpp_gets_parseable_tool_arguments_and_its_parse_500_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    with FaultTeacher(api_key=SECRET, provider="llama.cpp") as teacher:
        # The environment answered the broken call with an error; the teacher sees the conversation and answers.
        response = chat(make_client(teacher), messages=BROKEN_CALL)
        assert response.message["content"] == "echo: What is 2 + 2?" and teacher.server_errors == []
        sent = teacher.chat_requests()[-1].body["messages"][1]["tool_calls"][0]["function"]["arguments"]  # type: ignore[index]
        assert json.loads(sent) == {"invalid_json": "{expression: 2 + 2"}
        # A 500 saying the request cannot be parsed is deterministic: one attempt, counted, no blind retries.
        teacher.push(Fault("status", status=500, message="Failed to parse tool call arguments as JSON: parse error"))
        client = make_client(teacher)
        fails(client, "unparseable_request")
        assert len(teacher.chat_requests()) == 2 and client.metrics()["teacher/retries"] == 0


def test_empty_answer_after_reasoning_is_paid_counted_and_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    paid: list[tuple[str, Usage]] = []
    with FaultTeacher(api_key=SECRET, provider="llama.cpp") as teacher:
        teacher.push(Fault.reply({"content": ""}, usage={"prompt_tokens": 12, "completion_tokens": 30}))
        client = make_client(teacher, cache_dir=tmp_path)
        client.on_usage = lambda key, usage: paid.append((key, usage))
        error = fails(client, "empty")
        assert "after reasoning" in str(error)
        m = client.metrics()
        assert m["teacher/completion_tokens"] == 30 and m["teacher/empty"] == 1 and m["teacher/errors/empty"] == 1
        assert paid == [("k0", Usage(prompt_tokens=12, completion_tokens=30))]
        resumed = make_client(teacher, cache_dir=tmp_path)
        resumed.on_usage = lambda key, usage: paid.append((key, usage))
        fails(resumed, "empty")
        assert len(teacher.chat_requests()) == 1 and len(paid) == 1  # not paid again, not counted again
        assert resumed.metrics()["teacher/completion_tokens"] == 0


def test_reasoning_model_needs_max_completion_tokens_and_default_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    with FaultTeacher(api_key=SECRET, provider="openai-reasoning") as teacher:
        assert "max_completion_tokens" in str(fails(make_client(teacher), "bad_request"))
        refused = fails(make_client(teacher, max_tokens_field="max_completion_tokens"), "bad_request")  # temperature 0.7
        assert "Only the default (1) value" in str(refused)
        client = make_client(teacher, max_tokens_field="max_completion_tokens")
        client.sampling = client.sampling.model_copy(update={"temperature": None})  # unset: not sent
        response = chat(client)
        body = teacher.chat_requests()[-1].body
        assert body is not None and "temperature" not in body and "top_p" not in body and body["max_completion_tokens"] == 32
        assert response.usage is not None and response.usage.reasoning_tokens == 7
        assert client.metrics()["teacher/reasoning_tokens"] == 7


@pytest.mark.parametrize("provider", ["deepseek", "openrouter", "think-inline", "llama.cpp"])
def test_every_providers_reasoning_reaches_reasoning_content(monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    with FaultTeacher(api_key=SECRET, provider=provider) as teacher:
        response = chat(make_client(teacher))
    assert response.message == {"role": "assistant", "content": "echo: hello world",
                                "reasoning_content": "The user wrote 17 characters."}  # fmt: skip


def test_llama_cpp_sampling_defaults_are_warned_about_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(KEY_VAR, SECRET)
    with FaultTeacher(api_key=SECRET, provider="llama.cpp") as teacher, caplog.at_level(logging.WARNING, logger="apprentice.teacher"):
        client = make_client(teacher)
        chats(client, ["a", "b"])
        (warning,) = [r.getMessage() for r in caplog.records]
        assert "top_k = 40" in warning and "min_p = 0.05" in warning and "top_p = 0.95" in warning
        assert client.metrics()["teacher/warnings/sampling_mismatch"] == 1
        caplog.clear()
        pinned = make_client(teacher, top_p=1.0, extra_body={"top_k": 0, "min_p": 0.0})
        chat(pinned)
        assert caplog.records == []
    with FaultTeacher(api_key=SECRET, provider="deepseek") as teacher, caplog.at_level(logging.WARNING, logger="apprentice.teacher"):
        chat(make_client(teacher))
        assert caplog.records == []


def test_tags_only_when_enabled_and_outside_the_cache_key(teacher: FaultTeacher, tmp_path: Path) -> None:
    chat(make_client(teacher, cache_dir=tmp_path))
    assert not {"user", "prompt_cache_key"} & set(teacher.chat_requests()[0].body or {})
    tagged = make_client(teacher, cache_dir=tmp_path)
    tagged.endpoint = tagged.endpoint.model_copy(update={"prompt_cache_key": True, "user": "apprentice-test"})
    hit, _ = chats(tagged, ["k0", "fresh"])
    assert hit.cached  # turning tags on does not make a resumed run pay again
    body = teacher.chat_requests()[-1].body
    assert body is not None and body["user"] == "apprentice-test" and body["prompt_cache_key"].startswith("apprentice-")
    assert teacher.unknown_fields() == []


def test_set_aside_kinds_are_counted_per_kind_across_one_client(teacher: FaultTeacher) -> None:
    teacher.push(Fault.reply({"content": "a\ud800"}), Fault.empty(), Fault.reply(usage={"completion_tokens": 999}))
    client = make_client(teacher)

    async def go() -> list[str]:
        kinds = []
        try:
            for key in ("a", "b", "c", "d"):
                try:
                    await client.chat(MESSAGES, key=key)
                    kinds.append("ok")
                except ClientError as e:
                    kinds.append(e.kind)
        finally:
            await client.aclose()
        return kinds

    assert asyncio.run(go()) == ["invalid_text", "empty", "oversized", "ok"]
    m = client.metrics()
    assert (m["teacher/errors/invalid_text"], m["teacher/errors/empty"], m["teacher/errors/oversized"]) == (1, 1, 1)
