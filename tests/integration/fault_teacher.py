"""A fault-injecting OpenAI-compatible teacher: a real HTTP server on 127.0.0.1 for reliability tests.

It stands in for a hosted chat API (the one thing tests cannot reach) and behaves like a strict one:
  - any top-level request field outside the OpenAI chat-completions schema -> 400 with an OpenAI error body
    (so a client that leaks `return_token_ids` or another server-specific field fails loudly);
  - a wrong or missing `Authorization: Bearer KEY` -> 401 when `api_key` is set;
  - every request (path, headers, body) is recorded for assertions (`teacher.requests`).

Answers are deterministic: by default the assistant echoes the last user message (`"echo: ..."`); pass
`respond=` to answer differently (e.g. reverse the text so that a reverse-text student can learn from it).

Provider profiles (`FaultTeacher(provider=...)`, see `PROVIDERS`) behave like a given server beyond the strict
schema: OpenAI's reasoning models (refuse `max_tokens` and non-default temperature/top_p, report reasoning
tokens), DeepSeek (`reasoning_content`), OpenRouter (`reasoning`), a server without a reasoning parser (`<think>`
in content) and llama.cpp's llama-server (accepts its own sampling fields, `Server: llama.cpp`, `timings`, and a
500 "Failed to parse tool call arguments as JSON" for non-JSON tool-call arguments in the history).

Faults are scripted per request, two ways that compose:
  - `teacher.push(Fault.rate_limit(retry_after=0.05), Fault.server_error())`: a FIFO consumed by the next
    requests in arrival order (handy for one client call at a time);
  - `FaultTeacher(rule=fn)`: `fn(index, body) -> Fault | None` picks a fault from the request itself (handy for
    concurrent runs where arrival order is not deterministic, e.g. "the first attempt of every 3rd prompt").

Usage:
    with FaultTeacher(api_key="sk-test") as teacher:
        url = teacher.base_url          # "http://127.0.0.1:PORT/v1"
        teacher.push(Fault.drop())
        ...
        assert teacher.unknown_fields() == []
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Top-level fields of the OpenAI chat-completions request (platform.openai.com API reference). Anything else,
# including vLLM/SGLang extensions such as `return_token_ids`, is rejected like a strict hosted API would.
OPENAI_CHAT_FIELDS = frozenset(
    {
        "model", "messages", "tools", "tool_choice", "parallel_tool_calls", "temperature", "top_p", "n",
        "max_tokens", "max_completion_tokens", "stop", "seed", "stream", "stream_options", "frequency_penalty",
        "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "response_format",
        "service_tier", "store", "metadata", "reasoning_effort", "modalities", "prediction", "audio",
        "web_search_options", "verbosity", "prompt_cache_key", "safety_identifier",
    }
)  # fmt: skip
# Fields that only make sense for a token client (the local inference server); a teacher must never get them.
TOKEN_FIELDS = frozenset({"logprobs", "top_logprobs", "return_token_ids", "prompt_logprobs"})
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Fields a message may carry in the chat-completions schema; anything else (e.g. `reasoning_content`) is a 400.
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"})


@dataclass
class Fault:
    """What the server does with one request instead of (or before) answering normally."""

    kind: str
    """"status" (an HTTP error), "slow" (sleep then answer), "drop" (close the socket without a response),
    "malformed" (200 with invalid JSON), "empty" (empty content), "truncated" (finish_reason "length"),
    "tool_call" (answer with a tool call), "raw" (200 with `body` as is), "drip" (the headers, then the body one
    byte every `delay_s`), "huge" (a valid answer of `size` bytes, streamed until the client hangs up),
    "answer" (200 with `answer` merged into the normal message, `usage` and `finish_reason` overridden)."""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    message: str = ""
    tool_call: dict[str, Any] | None = None
    body: bytes = b""
    size: int = 0
    declare_length: bool = True
    answer: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None

    @staticmethod
    def rate_limit(retry_after: float | None = None) -> Fault:
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        return Fault("status", status=429, headers=headers, message="Rate limit reached; slow down.")

    @staticmethod
    def server_error(status: int = 500) -> Fault:
        return Fault("status", status=status, message="The server had an error while processing your request.")

    @staticmethod
    def bad_request(message: str = "Invalid request.") -> Fault:
        return Fault("status", status=400, message=message)

    @staticmethod
    def slow(delay_s: float) -> Fault:
        return Fault("slow", delay_s=delay_s)

    @staticmethod
    def drop() -> Fault:
        return Fault("drop")

    @staticmethod
    def malformed() -> Fault:
        return Fault("malformed")

    @staticmethod
    def empty() -> Fault:
        return Fault("empty")

    @staticmethod
    def truncated() -> Fault:
        return Fault("truncated")

    @staticmethod
    def call_tool(name: str, arguments: dict[str, Any] | str) -> Fault:
        """A tool call; a str `arguments` is sent as generated (e.g. not JSON at all)."""
        return Fault("tool_call", tool_call={"name": name, "arguments": arguments})

    @staticmethod
    def raw(body: bytes) -> Fault:
        return Fault("raw", body=body)

    @staticmethod
    def drip(interval_s: float) -> Fault:
        return Fault("drip", delay_s=interval_s)

    @staticmethod
    def huge(size: int, *, declare_length: bool = True) -> Fault:
        return Fault("huge", size=size, declare_length=declare_length)

    @staticmethod
    def reply(answer: dict[str, Any] | None = None, *, usage: dict[str, Any] | None = None, finish_reason: str | None = None) -> Fault:
        return Fault("answer", answer=answer, usage=usage, finish_reason=finish_reason)


@dataclass(frozen=True)
class Provider:
    """How a particular server departs from the strict schema (see PROVIDERS)."""

    extra_fields: frozenset[str] = frozenset()
    """Request fields accepted beyond the OpenAI schema."""
    reasoning: str | None = None
    """Where the answer's reasoning goes: "reasoning_content", "reasoning", "think" (inline) or None (hidden)."""
    refuse_max_tokens: bool = False
    """400 on `max_tokens`, asking for `max_completion_tokens` (OpenAI reasoning models)."""
    default_sampling_only: bool = False
    """400 on a temperature or top_p other than 1 (OpenAI reasoning models)."""
    reasoning_tokens: int = 0
    """Reported as usage.completion_tokens_details.reasoning_tokens (and added to completion_tokens)."""
    server_header: str | None = None
    timings: bool = False
    """llama.cpp adds a `timings` object to every answer."""
    parse_tool_arguments: bool = False
    """llama.cpp parses every tool call's arguments in the history: a 500 when they are not JSON."""


LLAMA_CPP_FIELDS = frozenset({"top_k", "min_p", "typical_p", "repeat_penalty", "mirostat", "n_probs", "cache_prompt", "id_slot"})
PROVIDERS = {
    "openai": Provider(),
    "openai-reasoning": Provider(refuse_max_tokens=True, default_sampling_only=True, reasoning_tokens=7),
    "deepseek": Provider(reasoning="reasoning_content"),
    "openrouter": Provider(reasoning="reasoning", reasoning_tokens=5),
    "think-inline": Provider(reasoning="think"),
    "llama.cpp": Provider(extra_fields=LLAMA_CPP_FIELDS, reasoning="reasoning_content", server_header="llama.cpp",
                          timings=True, parse_tool_arguments=True),
}  # fmt: skip


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: dict[str, Any] | None
    """The parsed JSON body (None when it was not JSON)."""


def echo(body: dict[str, Any]) -> str:
    """Default answer: "echo: " + the last user message's text."""
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return f"echo: {content}"
    return "echo:"


def reverse_last_user(body: dict[str, Any]) -> str:
    """A perfect reverse-text teacher: the last user message, reversed."""
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"][::-1]


class FaultTeacher:
    """A threaded HTTP server speaking the OpenAI chat-completions API with scripted faults. See module doc."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        respond: Callable[[dict[str, Any]], str] = echo,
        rule: Callable[[int, dict[str, Any]], Fault | None] | None = None,
        model: str = "fault-teacher",
        provider: str = "openai",
    ) -> None:
        self.api_key = api_key
        self.respond = respond
        self.rule = rule
        self.model = model
        self.provider = PROVIDERS[provider]
        self.requests: list[RecordedRequest] = []
        self.bytes_sent = 0
        """Body bytes written by "huge" and "drip" faults (how much the client let us send)."""
        self.server_errors: list[str] = []
        """Messages of the provider-behaviour errors answered (400s of a reasoning model, llama.cpp's 500s)."""
        self._script: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fault-teacher", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *faults: Fault) -> None:
        """Queue faults for the next requests, one per request, in arrival order."""
        with self._lock:
            self._script.extend(faults)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def unknown_fields(self) -> list[str]:
        """Every top-level field sent that a hosted OpenAI API would reject (should be empty)."""
        return sorted({k for r in self.chat_requests() if r.body for k in r.body if k not in OPENAI_CHAT_FIELDS})

    def token_fields(self) -> list[str]:
        """Every token-client field (logprobs, token ids) sent (should be empty for a teacher)."""
        return sorted({k for r in self.chat_requests() if r.body for k in r.body if k in TOKEN_FIELDS})

    def start(self) -> FaultTeacher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FaultTeacher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- request handling (called from the server's threads) ----

    def _next_fault(self, index: int, body: dict[str, Any]) -> Fault | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
        return self.rule(index, body) if self.rule is not None else None

    def _provider_error(self, body: dict[str, Any]) -> tuple[int, str, str | None] | None:
        """(status, message, param) of the provider's own refusal of a schema-valid request, or None."""
        p = self.provider
        if p.refuse_max_tokens and "max_tokens" in body:
            return 400, "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.", "max_tokens"
        for name in ("temperature", "top_p"):
            if p.default_sampling_only and name in body and body[name] != 1:
                return 400, f"Unsupported value: '{name}' does not support {body[name]} with this model. Only the default (1) value is supported.", name
        if p.parse_tool_arguments:
            for message in body["messages"]:
                for call in message.get("tool_calls") or []:
                    try:
                        json.loads(call["function"]["arguments"])
                    except (ValueError, KeyError, TypeError):
                        return 500, "Failed to parse tool call arguments as JSON: [json.exception.parse_error.101] parse error", None
        return None

    def _validate(self, body: Any) -> tuple[str, str | None] | None:
        """(message, param) of the first schema violation, or None."""
        if not isinstance(body, dict):
            return "The request body must be a JSON object.", None
        unknown = sorted(set(body) - OPENAI_CHAT_FIELDS - self.provider.extra_fields)
        if unknown:
            return f"Unrecognized request argument supplied: {unknown[0]}", unknown[0]
        for required in ("model", "messages"):
            if required not in body:
                return f"Missing required parameter: '{required}'.", required
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty array.", "messages"
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in MESSAGE_ROLES:
                return f"Invalid value for 'messages[{i}].role'.", f"messages[{i}].role"
            extra = sorted(set(message) - MESSAGE_FIELDS)
            if extra:
                return f"Unrecognized request argument supplied: messages[{i}].{extra[0]}", f"messages[{i}].{extra[0]}"
        return None

    def _completion(self, body: dict[str, Any], fault: Fault | None) -> dict[str, Any]:
        text = self.respond(body)
        finish = "stop"
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if fault is not None and fault.kind == "empty":
            message["content"] = ""
        elif fault is not None and fault.kind == "truncated":
            message["content"] = text[: max(1, len(text) // 2)]
            finish = "length"
        elif fault is not None and fault.kind == "tool_call":
            assert fault.tool_call is not None
            message["content"] = None
            message["tool_calls"] = [
                {
                    "id": f"call_{next(self._ids)}",
                    "type": "function",
                    "function": {
                        "name": fault.tool_call["name"],
                        "arguments": args if isinstance(args := fault.tool_call["arguments"], str) else json.dumps(args),
                    },
                }
            ]
            finish = "tool_calls"
        if fault is not None and fault.kind == "answer":
            message.update(fault.answer or {})
            finish = finish if fault.finish_reason is None else fault.finish_reason
        reasoning = f"The user wrote {len(echo(body))} characters."
        if self.provider.reasoning == "think":
            message["content"] = f"<think>\n{reasoning}\n</think>\n\n{message['content'] or ''}"
        elif self.provider.reasoning is not None and "reasoning_content" not in message:
            message[self.provider.reasoning] = reasoning
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        completion_tokens = len(str(message["content"] or "").split()) + self.provider.reasoning_tokens
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                 "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
        if self.provider.reasoning_tokens:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.provider.reasoning_tokens}
        if fault is not None and fault.usage is not None:
            usage = fault.usage
        out = {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage,
        }
        if self.provider.timings:
            out["timings"] = {"prompt_n": prompt_tokens, "predicted_n": completion_tokens}
        return out


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up (a timeout, a cancelled run) is expected here, not an error to print."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _make_handler(teacher: FaultTeacher) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

        def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            self._send_raw(status, json.dumps(payload).encode(), headers)

        def _send_raw(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
            self._send_head(status, len(data), headers)
            self.wfile.write(data)

        def _send_head(self, status: int, length: int | None, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if length is not None:
                self.send_header("Content-Length", str(length))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.flush()

        def version_string(self) -> str:
            return teacher.provider.server_header or super().version_string()

        def _stream(self, chunks: Iterator[bytes], length: int | None, interval_s: float = 0.0) -> None:
            """Write `chunks` one by one (sleeping between them) until done or the client hangs up."""
            try:
                self._send_head(200, length)
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    with teacher._lock:
                        teacher.bytes_sent += len(chunk)
                    if interval_s:
                        time.sleep(interval_s)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _authorized(self) -> bool:
            if teacher.api_key is None:
                return True
            return self.headers.get("Authorization") == f"Bearer {teacher.api_key}"

        def do_GET(self) -> None:
            teacher.requests.append(RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, None))
            if not self._authorized():
                self._send_json(401, _error_body("Incorrect API key provided.", "invalid_request_error"))
            elif self.path.rstrip("/").endswith("/models"):
                self._send_json(200, {"object": "list", "data": [{"id": teacher.model, "object": "model"}]})
            else:
                self._send_json(404, _error_body(f"Unknown path {self.path}", "invalid_request_error"))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                body: Any = json.loads(raw)
            except json.JSONDecodeError:
                body = None
            with teacher._lock:
                index = len(teacher.requests)
                teacher.requests.append(
                    RecordedRequest(
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body if isinstance(body, dict) else None,
                    )
                )
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send_json(404, _error_body(f"Unknown path {self.path}", "invalid_request_error"))
                return
            if not self._authorized():
                self._send_json(401, _error_body("Incorrect API key provided.", "invalid_request_error"))
                return
            problem = teacher._validate(body)
            if problem is not None:
                message, param = problem
                self._send_json(400, _error_body(message, "invalid_request_error", param, "invalid_request"))
                return
            refusal = teacher._provider_error(body)
            if refusal is not None:
                status, message, param = refusal
                teacher.server_errors.append(message)
                kind = "invalid_request_error" if status < 500 else "server_error"
                self._send_json(status, _error_body(message, kind, param, "unsupported_parameter" if param else None))
                return
            fault = teacher._next_fault(index, body)
            if fault is not None and fault.kind == "status":
                kind = "rate_limit_error" if fault.status == 429 else "server_error"
                self._send_json(fault.status, _error_body(fault.message, kind), fault.headers)
            elif fault is not None and fault.kind == "drop":
                self.close_connection = True
                self.connection.close()  # no status line at all: the client sees a dropped connection
            elif fault is not None and fault.kind == "malformed":
                self._send_raw(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "message": {"role": ')
            elif fault is not None and fault.kind == "raw":
                self._send_raw(200, fault.body)
            elif fault is not None and fault.kind == "drip":
                data = json.dumps(teacher._completion(body, None)).encode()
                self._stream((data[i : i + 1] for i in range(len(data))), len(data), fault.delay_s)
            elif fault is not None and fault.kind == "huge":
                head = b'{"id": "chatcmpl-huge", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "'
                tail = b'"}}]}'
                n = max(0, fault.size - len(head) - len(tail))
                block = b"x" * 65536
                pieces = itertools.chain([head], (block[: min(65536, n - i)] for i in range(0, n, 65536)), [tail])
                self._stream(pieces, fault.size if fault.declare_length else None)
            else:
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay_s)
                try:
                    self._send_json(200, teacher._completion(body, fault))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) while we slept

    return Handler


@contextlib.contextmanager
def serve_asgi(app: Any, *, ready_timeout_s: float = 30.0) -> Iterator[str]:
    """Run an ASGI app (e.g. `apprentice.inference.server.build_app(...)`) with real uvicorn on a free loopback
    port in a thread; yields its base URL "http://127.0.0.1:PORT/v1" and shuts it down (lifespan included)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start (see the log above)")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
