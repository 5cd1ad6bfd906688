"""Render prefixes of one conversation with the tokenizer's own chat template, fast and exactly.

`tokenizer.apply_chat_template` copies and normalises the whole message list on every call, which for the
per-turn prefixes of a long conversation costs more than the Jinja rendering itself. `ChatRenderer` prepares
each message once (the same normalisation transformers applies: drop None-valued keys, plain JSON data, alias
reasoning fields) and renders slices of the prepared list with the compiled template.

That fast path leans on private helpers of transformers. If they are missing, their signature changed, or a
sample's fast text differs from `apply_chat_template` (checked once per sample), the renderer falls back to
`apply_chat_template` for the rest of the process and logs why, once. None of that is the data's fault, so
none of it is counted as `template_error`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from apprentice.render.errors import RenderError
from apprentice.render.normalize import TemplateTraits, ToolCallArguments, normalize_message, template_traits

log = logging.getLogger("apprentice.render")
Message = dict[str, Any]

_FAST_DISABLED: str | None = None  # why the fast path is off for this process (logged once), or None
try:  # private helpers of transformers' own pipeline; without them we fall back to apply_chat_template
    from transformers.utils.chat_template_utils import (
        _alias_reasoning_fields,
        _compile_jinja_template,
        _normalize_chat_messages,
        _plain_template_data,
    )
except ImportError as _err:  # pragma: no cover - depends on the installed transformers
    _FAST_DISABLED = f"transformers has no {_err.name or 'chat-template helper'} ({_err})"

# What a failing template raises: its own raise_exception (TemplateError), undefined fields, string + None.
TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError)


def disable_fast_path(reason: str) -> None:
    """Use apply_chat_template from now on in this process; logged once with the reason."""
    global _FAST_DISABLED
    if _FAST_DISABLED is None:
        _FAST_DISABLED = reason
        log.warning("render: falling back to tokenizer.apply_chat_template (slower, same result): %s", reason)


def fast_path_disabled() -> str | None:
    return _FAST_DISABLED


class FastPathBroken(Exception):
    """The private transformers helpers misbehaved: not the trajectory's fault; the caller retries slowly."""


class ChatRenderer:
    """Renders `messages[:n]` of one conversation (with fixed tools and template kwargs) to text."""

    def __init__(
        self,
        tokenizer: Any,
        tools: list[dict] | None,
        template_kwargs: dict[str, Any] | None = None,
        tool_call_arguments: ToolCallArguments = "dict",
    ):
        self.tokenizer = tokenizer
        self.tool_call_arguments: ToolCallArguments = tool_call_arguments
        self.tools = tools
        self.template_kwargs = dict(template_kwargs or {})
        self.template: str = tokenizer.get_chat_template(None, tools)
        self._compiled: Any = None
        if _FAST_DISABLED is None and all(isinstance(tool, dict) for tool in tools or []):
            try:
                # Same precedence as apply_chat_template: explicit kwargs override the special-token names.
                kwargs = {**tokenizer.special_tokens_map, **self.template_kwargs}
                self._compiled = _compile_jinja_template(self.template)
                self._tools = _plain_template_data(tools)
                self._kwargs = _plain_template_data(kwargs)
            except TypeError as err:  # a changed private signature
                disable_fast_path(f"a transformers chat-template helper changed its signature ({err})")
                self._compiled = None

    @property
    def fast(self) -> bool:
        return self._compiled is not None and _FAST_DISABLED is None

    def prepare(self, message: Message) -> Any:
        """One message as the template sees it; prefixes of a prepared list render like the raw prefixes."""
        if not self.fast:
            return message
        try:
            return _alias_reasoning_fields(_plain_template_data(_normalize_chat_messages([message])))[0]
        except TypeError as err:
            disable_fast_path(f"a transformers chat-template helper changed its signature ({err})")
            raise FastPathBroken(str(err)) from err

    def render(self, prepared: Sequence[Any], add_generation_prompt: bool, where: str) -> str:
        """Text of the template over `prepared` (a prefix of a prepared conversation); RenderError if it fails."""
        try:
            if not self.fast:
                return self.reference(list(prepared), add_generation_prompt)
            return str(
                self._compiled.render(
                    messages=list(prepared),
                    tools=self._tools,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **self._kwargs,
                )
            )
        except TEMPLATE_ERRORS as err:
            raise RenderError("template_error", f"{where}: the chat template failed: {err}") from err

    def reference(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The text transformers itself renders (the ground truth the fast path must match)."""
        text = self.tokenizer.apply_chat_template(
            messages,
            tools=self.tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **self.template_kwargs,
        )
        return str(text)

    def check(self, messages: list[Message], text: str, add_generation_prompt: bool, where: str) -> None:
        """Compare one fast rendering with transformers' own; on a difference fall back for good (FastPathBroken)."""
        if not self.fast:
            return
        try:
            expected = self.reference(messages, add_generation_prompt)
        except TEMPLATE_ERRORS as err:
            raise RenderError("template_error", f"{where}: the chat template failed: {err}") from err
        if expected != text:
            disable_fast_path(f"{where}: the fast rendering differs from tokenizer.apply_chat_template")
            raise FastPathBroken(where)

    def traits(self) -> TemplateTraits:
        """The template's needs (arguments as string/dict, content "" for None, short ids), probed once."""
        key = (self.template, json.dumps(self.template_kwargs, sort_keys=True, default=str), self.tool_call_arguments)
        cached = _TRAITS.get(key)
        if cached is None:
            cached = template_traits(
                lambda msgs: self.reference(msgs, add_generation_prompt=False), self.tool_call_arguments
            )
            _TRAITS[key] = cached
        return cached


_TRAITS: dict[tuple[str, str, str], TemplateTraits] = {}
_STOPS: dict[tuple[int, str, str], tuple[str, ...]] = {}
_PROBE = "Probe answer 7"


def _generation_config_eos(tokenizer: Any) -> set[str]:
    """eos tokens of a local model directory's generation_config.json (where the model's stop tokens live)."""
    path = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError):
        return set()
    ids = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    return {str(tokenizer.convert_ids_to_tokens(int(i))) for i in ids}


def _special_after(text: str, start: int, specials: Sequence[str]) -> str | None:
    best: tuple[int, str] | None = None
    for token in specials:
        pos = text.find(token, start)
        if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(token) > len(best[1]))):
            best = (pos, token)
    return best[1] if best else None


def stop_markers(renderer: ChatRenderer) -> tuple[str, ...]:
    """The special tokens that end an assistant turn as the model generates it (it stops at the first).

    The tokenizer's eos token, the eos ids of a local generation_config.json, and two probes of the template:
    - after an answer, the first special token it writes: `<|im_end|>`, `<|eot_id|>`, `<|end|>` (Phi writes eos
      only after the last turn), `<end_of_turn>`, `<turn|>`, `</s>`, gpt-oss's `<|return|>`;
    - after a tool call, the special token that closes a conversation ending in that call: gpt-oss's `<|call|>`,
      Gemma 4's `<|tool_response>` (the model stops there and the server appends the results), R1's end of
      sentence after its `<｜tool▁call▁end｜><｜tool▁calls▁end｜>`, ChatML's `<|im_end|>`.
    Not every special token: gpt-oss writes `<|end|>` between its analysis and final channels, and Gemma 4 writes
    `<tool_call|>` after each of parallel calls; neither stops generation (a token that closes each call is not
    taken as the turn's end).
    """
    tok = renderer.tokenizer
    key = (id(tok), renderer.template, renderer.tool_call_arguments)
    if key in _STOPS:
        return _STOPS[key]
    specials = sorted(
        {t.content for t in tok.added_tokens_decoder.values() if t.special}, key=len, reverse=True
    )
    found: set[str] = set(_generation_config_eos(tok))
    if tok.eos_token:
        found.add(str(tok.eos_token))
    user = {"role": "user", "content": "Hi"}
    answer = _probe_render(renderer, [user, {"role": "assistant", "content": _PROBE}])
    if answer is not None and _PROBE in answer:
        marker = _special_after(answer, answer.rfind(_PROBE) + len(_PROBE), specials)
        if marker is not None:
            found.add(marker)
    # Two calls where the template takes them: a token that also closes each call (GLM-style `</tool_call>`)
    # ends the conversation too, but it is not where generation stops.
    calls = [
        {"id": f"a1b2c3d4{i}", "type": "function", "function": {"name": "probe_tool", "arguments": {"probe_arg": i}}}
        for i in (1, 2)
    ]
    traits = renderer.traits()
    for n in (2, 1):
        turn = normalize_message({"role": "assistant", "tool_calls": calls[:n]}, traits, "")
        called = _probe_render(renderer, [user, turn])
        if called is not None and "probe_arg" in called:
            tail = called[called.find("probe_arg") :].rstrip()
            marker = next((token for token in specials if tail.endswith(token)), None)
            if marker is not None and tail.count(marker) == 1:
                found.add(marker)
            break
    _STOPS[key] = tuple(sorted(found, key=len, reverse=True))
    return _STOPS[key]


def _probe_render(renderer: ChatRenderer, messages: list[Message]) -> str | None:
    try:
        return renderer.reference(messages, add_generation_prompt=False)
    except Exception:  # noqa: BLE001 - a probe: a template without tool calls simply adds nothing
        return None


def first_stop(text: str, start: int, markers: Sequence[str], skip: int = 0) -> tuple[int, int] | None:
    """(start, end) of the first stop marker in text[start:] after skipping `skip` of them, or None."""
    pos = start
    while True:
        best: tuple[int, int] | None = None
        for marker in markers:  # longest first: on equal starts the longer marker wins
            at = text.find(marker, pos)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, at + len(marker))
        if best is None or skip == 0:
            return best
        skip -= 1
        pos = best[1]
