"""A tool-calculator episode over real HTTP: the official `openai` client against a strict loopback server.

Checks that the conversation the environment builds (assistant turns with `content: null` + `tool_calls`, `tool`
messages with `tool_call_id`) is accepted by a server that rejects any message field outside the OpenAI chat
schema, and that provider extras in parsed responses (`refusal`, `annotations`, ...) never reach the next request.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from openai import AsyncOpenAI

from apprentice.clients.base import ChatResponse
from apprentice.config import EnvConfig
from apprentice.envs.registry import load_environment

ALLOWED_MESSAGE_FIELDS = {
    "system": {"role", "content"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "tool_calls"},
    "tool": {"role", "content", "tool_call_id"},
}
ALLOWED_REQUEST_FIELDS = {"model", "messages", "tools"}


def _problems(body: dict[str, Any]) -> list[str]:
    problems = [f"unknown request field {k!r}" for k in body if k not in ALLOWED_REQUEST_FIELDS]
    call_ids: set[str] = set()
    for i, m in enumerate(body["messages"]):
        allowed = ALLOWED_MESSAGE_FIELDS.get(m.get("role"), set())
        problems += [f"messages[{i}]: unknown field {k!r}" for k in m if k not in allowed]
        if m["role"] == "assistant":
            call_ids |= {c["id"] for c in m.get("tool_calls", [])}
            if m.get("content") is None and not m.get("tool_calls"):
                problems.append(f"messages[{i}]: assistant message with neither content nor tool_calls")
        if m["role"] == "tool" and m.get("tool_call_id") not in call_ids:
            problems.append(f"messages[{i}]: tool_call_id {m.get('tool_call_id')!r} answers no call")
    return problems


class _Handler(BaseHTTPRequestHandler):
    """Turn 1: call the calculator on the question's expression; turn 2: answer with the tool's result."""

    requests: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        problems = _problems(body)
        if problems:
            self._send(400, {"error": {"message": "; ".join(problems), "type": "invalid_request_error"}})
            return
        last = body["messages"][-1]
        if last["role"] == "user":
            expression = last["content"].removeprefix("What is ").removesuffix("?")
            call = {
                "id": "call_abc",
                "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})},
            }
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        else:
            message, finish = {"role": "assistant", "content": f"The answer is {last['content']}."}, "stop"
        message |= {"refusal": None, "annotations": []}  # extras a hosted API returns
        self._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            },
        )


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


class OpenAIChat:
    """The thinnest ChatClient over the official client (the project's teacher client adds retries, cache...)."""

    def __init__(self, base_url: str) -> None:
        self.client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None, key: str = ""
    ) -> ChatResponse:
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        response = await self.client.chat.completions.create(model="m", messages=messages, **extra)  # type: ignore[arg-type]
        choice = response.choices[0]
        return ChatResponse(message=choice.message.model_dump(), finish_reason=choice.finish_reason)


def test_tool_calculator_over_http(server: str) -> None:
    env = load_environment(EnvConfig(id="tool-calculator", args={"num_tasks": 3, "num_eval_tasks": 0}), seed=2)

    async def episodes() -> list[dict[str, Any]]:
        client = OpenAIChat(server)
        return await asyncio.gather(*(env.rollout(t, client, f"calc/{t.id}") for t in env.tasks("train")))

    trajectories = asyncio.run(episodes())
    assert [_problems(r) for r in _Handler.requests] == [[]] * 6  # every request valid: 3 tasks x 2 turns
    for traj, task in zip(trajectories, env.tasks("train"), strict=True):
        assert traj["reward"] == 1.0 and traj["metrics"]["num_tool_calls"] == 1.0
        assert traj["metrics"]["tool_errors"] == 0.0
        call_turn, answer_turn = traj["steps"]
        assert call_turn["completion"][0]["content"] is None
        assert answer_turn["prompt"][-1] == {"role": "tool", "tool_call_id": "call_abc", "content": str(task.answer)}
    second = [r for r in _Handler.requests if r["messages"][-1]["role"] == "tool"]
    assert len(second) == 3 and all(r["tools"][0]["function"]["name"] == "calculator" for r in second)
