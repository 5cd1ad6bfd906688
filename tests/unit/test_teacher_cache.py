"""The teacher cache trusts nothing it reads back: a damaged entry is a miss with one warning naming the file.
Identical requests in flight at once share one call (SharedRequests)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from apprentice import fsio
from apprentice.clients.cache import ResponseCache, SharedRequests

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1.0}
GOOD = {"message": {"role": "assistant", "content": "ih"}, "finish_reason": "stop",
        "prompt_ids": None, "completion_ids": [5, 6], "completion_logprobs": [-0.5, -0.25]}  # fmt: skip


def entry(response: Any) -> bytes:
    return json.dumps({"key": "k", "request": REQUEST, "response": response}).encode()


DAMAGED: dict[str, bytes] = {
    "empty": b"",
    "truncated": entry(GOOD)[:-7],
    "not_utf8": b"\xff\xfe{}",
    "not_json": b"<html>502 Bad Gateway</html>",
    "json_list": b"[1, 2, 3]",
    "no_response": json.dumps({"key": "k", "request": REQUEST}).encode(),
    "response_string": entry("ih"),
    "message_string": entry({**GOOD, "message": "ih"}),
    "content_number": entry({**GOOD, "message": {"role": "assistant", "content": 3}}),
    "no_finish_reason": entry({"message": GOOD["message"]}),
    "ids_not_ints": entry({**GOOD, "completion_ids": ["a", "b"]}),
    "ids_logprobs_disagree": entry({**GOOD, "completion_logprobs": [-0.5]}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_damaged_entry_is_a_miss_with_one_warning_then_overwritten(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = ResponseCache(tmp_path)
    path = cache.put(REQUEST, "k", GOOD)
    assert cache.get(REQUEST, "k") == GOOD
    path.write_bytes(DAMAGED[damage])
    with caplog.at_level(logging.WARNING, logger="apprentice.teacher_cache"):
        assert cache.get(REQUEST, "k") is None
    assert len(caplog.records) == 1 and str(path) in caplog.text
    cache.put(REQUEST, "k", GOOD)  # what the client does after the miss: the fresh answer replaces the entry
    assert cache.get(REQUEST, "k") == GOOD


def test_lone_surrogate_is_stored_losslessly_and_modes_are_standard(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    odd = {**GOOD, "message": {"role": "assistant", "content": "ab\ud800cd"}}
    path = cache.put(REQUEST, "k", odd)
    assert cache.get(REQUEST, "k") == odd
    assert os.stat(path).st_mode & 0o777 == fsio.FILE_MODE & ~fsio._umask()


def test_shared_requests_survive_the_first_caller_being_cancelled() -> None:
    """Identical requests in flight share one call; the caller that started it being cancelled (its rollout
    dropped) neither cancels the answer the others wait for nor leaves the digest marked as in flight."""
    calls: list[int] = []
    shared: list[int] = []
    requests = SharedRequests(on_shared=lambda: shared.append(1))

    async def answer() -> str:
        calls.append(1)
        await asyncio.sleep(0.05)
        return "scores"

    async def run() -> tuple[str, str]:
        first = asyncio.create_task(requests.run("d", answer))
        await asyncio.sleep(0)  # the first call is in flight
        second = asyncio.create_task(requests.run("d", answer))
        await asyncio.sleep(0.01)
        first.cancel()
        got = await second
        assert first.cancelled()
        return got, await requests.run("d", answer)  # done: a new call, not a stale one

    assert asyncio.run(run()) == ("scores", "scores")
    assert len(calls) == 2 and len(shared) == 1


def test_remembered_answers_stay_and_failures_do_not() -> None:
    """`remember` (the endpoint teacher side's prompt requests): an answer stays for later calls, a failure is
    asked again, and more than `remember` answers drop them all."""
    calls: list[str] = []

    async def answer(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0)
        if key == "bad" and calls.count("bad") == 1:
            raise RuntimeError("refused once")
        return key.upper()

    async def run() -> None:
        requests = SharedRequests(remember=2)
        assert await requests.run("a", lambda: answer("a")) == "A"
        assert await requests.run("a", lambda: answer("a")) == "A"  # remembered: no second call
        with pytest.raises(RuntimeError, match="refused once"):
            await requests.run("bad", lambda: answer("bad"))
        assert await requests.run("bad", lambda: answer("bad")) == "BAD"  # the failure was not remembered
        assert await requests.run("c", lambda: answer("c")) == "C"
        assert await requests.run("d", lambda: answer("d")) == "D"  # three held: all dropped first
        assert await requests.run("a", lambda: answer("a")) == "A"

    asyncio.run(run())
    assert calls == ["a", "bad", "bad", "c", "d", "a"]
