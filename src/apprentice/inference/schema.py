"""Request schema of the built-in server (strict: unknown top-level fields are a 400) and response helpers."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from apprentice.trajectory import parsed_arguments

MAX_STOP_STRINGS = 16
"""Stop strings per request (OpenAI allows 4): each is searched for after every token."""
MAX_STOP_CHARS = 256
"""Characters per stop string."""
INT64 = 2**63


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys are allowed on messages: SDKs echo back assistant messages with `refusal`, `annotations`, ...
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The supported subset of the OpenAI chat-completions request, plus vLLM's `return_token_ids`."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    parallel_tool_calls: bool | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=64)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, le=INT64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    return_token_ids: bool = False
    """vLLM extension: prompt_token_ids in the response and token_ids in each choice."""
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template (text parts joined, unset fields left out), tool-call
        arguments parsed into objects as vLLM hands them over (so a template prints them its own way)."""
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                d["content"] = "".join(p.text for p in m.content)
            if d.get("tool_calls"):
                d["tool_calls"] = [_with_parsed_arguments(c) for c in d["tool_calls"]]
            out.append(d)
        return out


def _with_parsed_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call whose `function.arguments` is the parsed object; `{}` where they are not a JSON object (vLLM
    does the same: the template must still render the turn)."""
    fn = call.get("function")
    if not isinstance(fn, dict):
        return call
    try:
        arguments = parsed_arguments(fn.get("arguments"))
    except ValueError:
        arguments = {}
    return {**call, "function": {**fn, "arguments": arguments}}


class LoadWeightsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    """A Hugging Face model directory readable by the server (e.g. OUTPUT/weights/step_{n})."""
    step: int | None = Field(default=None, ge=0, le=2**62)
    """Trainer step these weights come from, reported by GET /v1/weights (default: the current step + 1)."""


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI-style error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_error_body(e: ValidationError) -> dict[str, Any]:
    """A pydantic error as an OpenAI 400 body naming the first offending field."""
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return error_body(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_field")
    message = first["msg"].removeprefix("Value error, ")
    return error_body(f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split Qwen-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks out of generated text.

    Returns (remaining content or None, OpenAI tool_calls with JSON-string arguments). If any block is not valid
    JSON with a name, nothing is parsed: the text stays content, so a malformed call is visible, not lost.
    """
    blocks = _TOOL_CALL.findall(text)
    if not blocks:
        return text, []
    calls = []
    for block in blocks:
        try:
            obj = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        arguments = obj.get("arguments", {})
        calls.append({
            "id": new_id("call"),
            "type": "function",
            "function": {"name": obj["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
        })  # fmt: skip
    content = _TOOL_CALL.sub("", text).strip()
    return (content or None), calls
