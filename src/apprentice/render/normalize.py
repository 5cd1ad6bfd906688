"""Messages as the student's serving engine hands them to its chat template: one normaliser, per-template traits.

OpenAI-format agent traces carry `content: null` on tool-call turns, tool-call `arguments` as a JSON *string*,
and ids like "call_0". Serving engines reshape them before the chat template sees them, and the student must be
trained on the text its own server will render:

- vLLM (and SGLang) parse every tool call's `arguments` string into a dict before rendering
  (`tool_call_arguments = "dict"`, the default; a `content: null` reaches the template as ""): the template
  prints the object its own way (`{"condition": true}` through `tojson`, Gemma 4's `{condition:true}`),
  whatever spacing the teacher wrote.
  Missing or empty arguments become `{}`; arguments that are not a JSON object are coerced to `{}` by vLLM, so
  a trained turn holding such a call is set aside (`invalid_arguments`) rather than taught as a different call.
- llama.cpp passes the string where the template renders it as it would the parsed object, and parses it
  only where the template needs an object (`| items`, `| tojson` would double-encode, Gemma 4 would wrap it in
  another pair of braces): `tool_call_arguments = "string"`.

Other template needs are probed once per template too: some concatenate `message.content` (a missing content
fails), Mistral's require 9-character alphanumeric ids. `template_traits` renders tiny probe conversations,
`normalize_message` applies what it found; `tool_call_for_template` turns a tool call (OpenAI nested or flat,
string or dict arguments) into the shape the template expects; calls coming from a server were already
normalised by `apprentice.trajectory.normalize_tool_call` (client and environments).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from apprentice.render.errors import RenderError
from apprentice.trajectory import parsed_arguments

Message = dict[str, Any]
ArgumentsAs = Literal["string", "dict"]
ToolCallArguments = Literal["dict", "string"]
"""How the serving engine hands tool-call arguments to the template: "dict" (vLLM, SGLang) or "string" (llama.cpp)."""


def tool_call_for_template(
    call: dict[str, Any], *, arguments: ArgumentsAs = "string", default_id: str | None = None
) -> dict[str, Any]:
    """`{"id", "type": "function", "function": {"name", "arguments"}}` from an OpenAI or flat tool call.

    `arguments="string"` gives the JSON string the OpenAI API uses (dicts are serialised); `"dict"` gives the
    parsed object, as vLLM hands it to chat templates: missing, null or empty arguments are `{}`, anything that
    is not a JSON object raises ValueError. The id is kept, else `default_id`; never mutates `call`.
    """
    fn: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else call
    args = fn.get("arguments", fn.get("parameters", {}))
    if arguments == "string":
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    else:
        args = parsed_arguments(args)
    out: dict[str, Any] = {"type": "function", "function": {"name": str(fn.get("name", "")), "arguments": args}}
    call_id = call.get("id") or default_id
    if call_id is not None:
        out["id"] = str(call_id)
    return out


@dataclass(frozen=True)
class TemplateTraits:
    """What one chat template needs, found by probing it (see `template_traits`)."""

    arguments: ArgumentsAs = "dict"
    """How the template gets tool-call arguments: always "dict" as vLLM gives them; with the "string" setting
    (llama.cpp) "dict" only where a string would not render as the parsed object does."""
    empty_content: bool = False
    """Whether a missing/None content becomes "": always as vLLM hands it over; with the "string" setting only where
    the template fails on a tool-call turn without content."""
    short_ids: bool = False
    """Whether tool-call ids must be 9 alphanumeric characters (Mistral); ids are then mapped deterministically."""


_PROBE_ARGS = {"probe": 1}
_LONG_ID, _SHORT_ID = "call_probe_0", "a1b2c3d4e"


def template_traits(
    render: Callable[[list[Message]], str], tool_call_arguments: ToolCallArguments = "dict"
) -> TemplateTraits:
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

    as_dict, as_string = dict(_PROBE_ARGS), json.dumps(_PROBE_ARGS)
    variants = (as_dict, as_string) if tool_call_arguments == "dict" else (as_string, as_dict)
    short = all(attempt(conv(a, "", _LONG_ID)) is None for a in variants) and any(
        attempt(conv(a, "", _SHORT_ID)) is not None for a in variants
    )
    call_id = _SHORT_ID if short else _LONG_ID
    arguments: ArgumentsAs = "dict"
    if tool_call_arguments == "string":
        # The string is passed where the template renders it as it renders the parsed object (Qwen3, Hermes
        # print it verbatim) or only takes strings; else the template needs the object (`| tojson` would
        # double-encode the string, `| items` fails on it, Gemma 4 wraps it in a second pair of braces).
        from_string, from_dict = attempt(conv(as_string, "", call_id)), attempt(conv(as_dict, "", call_id))
        if from_string is not None and from_dict in (None, from_string):
            arguments = "string"
    probe_args: Any = as_dict if arguments == "dict" else json.dumps(_PROBE_ARGS)
    empty = tool_call_arguments == "dict" or (  # vLLM joins a missing content's text parts: ""
        attempt(conv(probe_args, None, call_id)) is None and attempt(conv(probe_args, "", call_id)) is not None
    )
    return TemplateTraits(arguments=arguments, empty_content=empty, short_ids=short)


def _shaped_call(call: dict[str, Any], traits: TemplateTraits, where: str, trained: bool) -> dict[str, Any]:
    try:
        return tool_call_for_template(call, arguments=traits.arguments)
    except (ValueError, TypeError) as err:
        if trained or traits.arguments == "string":
            raise RenderError(
                "invalid_arguments",
                f"{where}: tool call arguments must be a JSON object to reach the template as the serving engine "
                f"gives them, but {err}",
            ) from err
        fn = call["function"] if isinstance(call.get("function"), dict) else call
        flat = {"id": call.get("id"), "function": {"name": fn.get("name", ""), "arguments": {}}}
        return tool_call_for_template(flat, arguments="dict")


def short_id(call_id: str) -> str:
    """A deterministic 9-character alphanumeric id for `call_id` (the same id for a call and its result)."""
    if len(call_id) == 9 and call_id.isalnum():
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def normalize_message(message: Message, traits: TemplateTraits, where: str, *, trained: bool = True) -> Message:
    """A copy of `message` shaped for the template (content, tool-call arguments and ids); never mutates.

    Tool-call arguments that are not a JSON object cannot be handed over as one: in a trained turn that is a
    RenderError("invalid_arguments") (the student would learn a call the teacher did not make); in history (not
    trained) they become `{}`, as vLLM renders them."""
    out = dict(message)
    calls = message.get("tool_calls")
    if calls == [] and traits.arguments == "dict":
        del out["tool_calls"]  # vLLM drops an empty list: the template takes its plain-answer path
    if calls:
        out["tool_calls"] = [_shaped_call(call, traits, where, trained) for call in calls]
        if traits.short_ids:
            for call in out["tool_calls"]:
                if "id" in call:
                    call["id"] = short_id(call["id"])
    if traits.short_ids and isinstance(message.get("tool_call_id"), str):
        out["tool_call_id"] = short_id(message["tool_call_id"])
    if traits.empty_content and out.get("content") is None:
        out["content"] = ""
    return out
