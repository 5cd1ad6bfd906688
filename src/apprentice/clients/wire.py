"""What a conversation looks like on the wire to a teacher, and which tool calls are broken.

Trajectories keep everything the teacher generated (its reasoning, tool calls exactly as produced). Requests
carry only what strict servers accept:
  - message fields of the chat-completions schema (a hosted API rejects `reasoning_content` with a 400);
  - tool-call arguments that are a JSON object. A teacher sometimes produces arguments that are not JSON; the
    environment answers such a call with an error, and the next request sends the conversation back. llama.cpp's
    server parses every argument string and answers `HTTP 500: Failed to parse tool call arguments as JSON`,
    which would lose the rollout, and chat templates that iterate `arguments.items()` fail on a non-object. The
    wire copy therefore carries `{"invalid_json": "<the text as generated>"}`: valid everywhere, and the teacher
    still sees what it sent next to the tool's error message. Such a rollout is never trained on
    (`invalid_tool_calls`, set aside as `invalid_tool_call`): the student must not learn broken calls.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Message fields of the chat-completions schema. Trajectories carry more (the teacher's `reasoning_content` of
# earlier turns, kept for training); strict hosted APIs reject such fields in requests, so they stay home.
WIRE_MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})


def arguments_ok(arguments: Any) -> bool:
    """Whether tool-call arguments are a JSON object in a string (what every server and template accepts)."""
    if not isinstance(arguments, str):
        return False
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


def wire_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    if not isinstance(fn, dict) or arguments_ok(fn.get("arguments")):
        return call
    raw = fn.get("arguments")
    fixed = json.dumps({"invalid_json": raw if isinstance(raw, str) else json.dumps(raw)}, ensure_ascii=False)
    return {**call, "function": {**fn, "arguments": fixed}}


def wire_message(message: dict[str, Any]) -> dict[str, Any]:
    """`message` with only the fields a hosted OpenAI-compatible API accepts and parseable tool-call arguments."""
    out = {k: v for k, v in message.items() if k in WIRE_MESSAGE_FIELDS}
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [wire_tool_call(c) if isinstance(c, dict) else c for c in out["tool_calls"]]
    return out


def invalid_tool_calls(trajectory: dict[str, Any]) -> int:
    """How many assistant tool calls of a trajectory have arguments that are not a JSON object."""
    count = 0
    for step in trajectory.get("steps") or []:
        for message in step.get("completion") or []:
            for call in message.get("tool_calls") or []:
                fn = call.get("function") if isinstance(call, dict) else None
                count += not (isinstance(fn, dict) and arguments_ok(fn.get("arguments")))
    return count


def prompt_cache_key(messages: list[dict[str, Any]]) -> str:
    """A stable tag of a conversation's shared prefix: the messages up to and including the first user turn.

    Every sample and every later turn of one task share it (so a provider's prompt cache can route them to the
    same cache), and it does not depend on the run, the step or the sample.
    """
    prefix: list[dict[str, Any]] = []
    for message in messages:
        prefix.append({"role": message.get("role"), "content": message.get("content")})
        if message.get("role") == "user":
            break
    canonical = json.dumps(prefix, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return "apprentice-" + hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]
