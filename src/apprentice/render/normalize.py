"""Messages as the student's chat template expects them: one normaliser for tool calls, per-template traits.

OpenAI-format agent traces carry `content: null` on tool-call turns, tool-call `arguments` as a JSON *string*,
and ids like "call_0". Templates differ: some concatenate `message.content` (a missing content fails), some
render `arguments | tojson` (a string would be double-encoded, `"{\\"x\\": 1}"`), some need dict arguments for
`| items`, Mistral's require 9-character alphanumeric ids. `template_traits` finds out once per template by
rendering tiny probe conversations, and `normalize_message` applies what it found; `tool_call_for_template` turns
a tool call (OpenAI nested or flat, string or dict arguments) into the shape the template expects; calls coming
from a server were already normalised by `apprentice.trajectory.normalize_tool_call` (client and environments).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from apprentice.render.errors import RenderError

Message = dict[str, Any]
ArgumentsAs = Literal["string", "dict"]


def tool_call_for_template(
    call: dict[str, Any], *, arguments: ArgumentsAs = "string", default_id: str | None = None
) -> dict[str, Any]:
    """`{"id", "type": "function", "function": {"name", "arguments"}}` from an OpenAI or flat tool call.

    `arguments="string"` gives the JSON string the OpenAI API uses (dicts are serialised); `"dict"` gives the
    parsed object many chat templates expect (a string that is not a JSON object raises ValueError). The id is
    kept, else `default_id`; never mutates `call`.
    """
    fn: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else call
    args = fn.get("arguments", fn.get("parameters", {}))
    if arguments == "string":
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    elif isinstance(args, str):
        parsed = json.loads(args) if args.strip() else {}
        if not isinstance(parsed, dict):
            raise ValueError(f"tool call arguments are not a JSON object: {args!r}")
        args = parsed
    out: dict[str, Any] = {"type": "function", "function": {"name": str(fn.get("name", "")), "arguments": args}}
    call_id = call.get("id") or default_id
    if call_id is not None:
        out["id"] = str(call_id)
    return out


@dataclass(frozen=True)
class TemplateTraits:
    """What one chat template needs, found by probing it (see `template_traits`)."""

    arguments: ArgumentsAs = "string"
    """How the template wants tool-call arguments: "dict" when it renders a string double-encoded or fails on it."""
    empty_content: bool = False
    """Whether a missing/None content must become "" (the template fails on a tool-call turn without content)."""
    short_ids: bool = False
    """Whether tool-call ids must be 9 alphanumeric characters (Mistral); ids are then mapped deterministically."""


_PROBE_ARGS = {"probe": 1}
_LONG_ID, _SHORT_ID = "call_probe_0", "a1b2c3d4e"


def template_traits(render: Callable[[list[Message]], str]) -> TemplateTraits:
    """Probe a template with a one-call conversation in each variant; `render(messages)` raises on failure."""

    def conv(args: Any, content: Any, call_id: str) -> list[Message]:
        call = {"id": call_id, "type": "function", "function": {"name": "probe_tool", "arguments": args}}
        return [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": content, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call_id, "content": "ok"},
            {"role": "assistant", "content": "done"},
        ]

    def attempt(messages: list[Message]) -> str | None:
        try:
            return render(messages)
        except Exception:  # noqa: BLE001 - a probe: any failure means "not this variant"
            return None

    short = False
    if attempt(conv(json.dumps(_PROBE_ARGS), "", _LONG_ID)) is None and attempt(
        conv(json.dumps(_PROBE_ARGS), "", _SHORT_ID)
    ) is not None:
        short = True
    call_id = _SHORT_ID if short else _LONG_ID
    as_string = attempt(conv(json.dumps(_PROBE_ARGS), "", call_id))
    as_dict = attempt(conv(dict(_PROBE_ARGS), "", call_id))
    arguments: ArgumentsAs = "string"
    natural = ('{"probe": 1}', '{"probe":1}')
    string_ok = as_string is not None and any(n in as_string for n in natural) and '\\"probe' not in as_string
    dict_ok = as_dict is not None and any(n in as_dict for n in natural)
    if (dict_ok and not string_ok) or (as_string is None and as_dict is not None):
        arguments = "dict"  # a string would be double-encoded, or the template iterates the arguments (`| items`)
    probe_args: Any = dict(_PROBE_ARGS) if arguments == "dict" else json.dumps(_PROBE_ARGS)
    empty = attempt(conv(probe_args, None, call_id)) is None and attempt(conv(probe_args, "", call_id)) is not None
    return TemplateTraits(arguments=arguments, empty_content=empty, short_ids=short)


def short_id(call_id: str) -> str:
    """A deterministic 9-character alphanumeric id for `call_id` (the same id for a call and its result)."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def normalize_message(message: Message, traits: TemplateTraits, where: str) -> Message:
    """A copy of `message` shaped for the template (content, tool-call arguments and ids); never mutates."""
    out = dict(message)
    calls = message.get("tool_calls")
    if calls:
        try:
            out["tool_calls"] = [tool_call_for_template(c, arguments=traits.arguments) for c in calls]
        except (ValueError, TypeError) as err:
            raise RenderError(
                "template_dropped", f"{where}: the template renders arguments as JSON objects, but {err}"
            ) from err
        if traits.short_ids:
            for call in out["tool_calls"]:
                if "id" in call:
                    call["id"] = short_id(call["id"])
    if traits.short_ids and isinstance(message.get("tool_call_id"), str):
        out["tool_call_id"] = short_id(message["tool_call_id"])
    if traits.empty_content and out.get("content") is None:
        out["content"] = ""
    return out
