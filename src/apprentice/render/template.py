"""Render prefixes of one conversation with the tokenizer's own chat template, fast and exactly.

`tokenizer.apply_chat_template` copies and normalises the whole message list on every call, which for the
per-turn prefixes of a long conversation costs more than the Jinja rendering itself. `ChatRenderer` prepares
each message once (the same normalisation transformers applies: drop None-valued keys, plain JSON data, alias
reasoning fields) and renders slices of the prepared list with the compiled template. Every sample's final text
is rendered a second time through `apply_chat_template` and compared (`check`), so a transformers upgrade that
changes the pipeline fails loudly instead of training on a drifted text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jinja2

from apprentice.render.errors import RenderError
from apprentice.render.reasoning import reasoning_of, strip_think

Message = dict[str, Any]

try:  # private helpers of transformers' own pipeline; without them we fall back to apply_chat_template
    from transformers.utils.chat_template_utils import (
        _alias_reasoning_fields,
        _compile_jinja_template,
        _normalize_chat_messages,
        _plain_template_data,
    )

    _FAST = True
except ImportError:  # pragma: no cover - depends on the installed transformers
    _FAST = False

# What a failing template raises: its own raise_exception (TemplateError), undefined fields, string + None.
TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError)


class ChatRenderer:
    """Renders `messages[:n]` of one conversation (with fixed tools and template kwargs) to text."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None, template_kwargs: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.tools = tools
        self.template_kwargs = dict(template_kwargs or {})
        # Same precedence as apply_chat_template: explicit kwargs override the special-token names.
        kwargs = {**tokenizer.special_tokens_map, **self.template_kwargs}
        self._compiled: Any = None
        if _FAST and all(isinstance(tool, dict) for tool in tools or []):
            template = tokenizer.get_chat_template(None, tools)
            self._compiled = _compile_jinja_template(template)
            self._tools = _plain_template_data(tools)
            self._kwargs = _plain_template_data(kwargs)

    def prepare(self, message: Message) -> Any:
        """One message as the template sees it; prefixes of a prepared list render like the raw prefixes."""
        if self._compiled is None:
            return message
        return _alias_reasoning_fields(_plain_template_data(_normalize_chat_messages([message])))[0]

    def render(self, prepared: Sequence[Any], add_generation_prompt: bool, where: str) -> str:
        """Text of the template over `prepared` (a prefix of a prepared conversation); RenderError if it fails."""
        try:
            if self._compiled is None:
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

    def check(self, messages: list[Message], text: str, where: str) -> None:
        """Assert that the fast rendering of `messages` equals transformers' own (one extra render per sample)."""
        if self._compiled is None:
            return
        try:
            expected = self.reference(messages, add_generation_prompt=False)
        except TEMPLATE_ERRORS as err:
            raise RenderError("template_error", f"{where}: the chat template failed: {err}") from err
        if expected != text:
            # Not a property of the trajectory: our copy of the transformers pipeline has drifted from it.
            raise RuntimeError(
                f"{where}: ChatRenderer's fast rendering differs from tokenizer.apply_chat_template; the installed "
                "transformers changed its chat-template pipeline. Update apprentice/render/template.py."
            )


def end_of_turn_markers(tokenizer: Any) -> tuple[str, ...]:
    """Strings that can end an assistant turn: the special added tokens and the eos token, longest first.

    Read from the tokenizer instead of hard-coding ChatML, so `<|eot_id|>`, `<end_of_turn>`, `</s>` work alike.
    """
    markers = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    if tokenizer.eos_token:
        markers.add(str(tokenizer.eos_token))
    return tuple(sorted(markers, key=len, reverse=True))


def find_end_of_turn(text: str, start: int, markers: Sequence[str]) -> tuple[int, str] | None:
    """(end position, marker) of the last end-of-turn marker in text[start:], or None if there is none.

    The generated text of a turn runs from the generation prompt up to and including its terminator; anything
    the template writes after the terminator (typically a newline) is template text, not generated.
    """
    best: tuple[int, str] | None = None
    for marker in markers:  # longest first: on equal end positions the longer marker wins
        pos = text.rfind(marker, start)
        if pos >= 0 and (best is None or pos + len(marker) > best[0]):
            best = (pos + len(marker), marker)
    return best


def check_turn_rendered(message: Message, generated: str, reads_reasoning: bool, where: str) -> None:
    """RenderError("template_dropped") if the template left out part of the turn: its answer text, a tool call's
    name, or (when the template reads reasoning fields) its reasoning. E.g. SmolLM2's template ignores tool_calls,
    which would otherwise train the student to answer without calling the tool."""
    content = message.get("content")
    if isinstance(content, str) and strip_think(content).strip() not in generated:
        raise RenderError("template_dropped", f"{where}: the chat template did not render the turn's content")
    for call in message.get("tool_calls") or []:
        name = (call.get("function") or call).get("name", "")
        if name not in generated:
            raise RenderError("template_dropped", f"{where}: the chat template did not render tool call {name!r}")
    thought = reasoning_of(message)
    if reads_reasoning and thought is not None and thought.strip() not in generated:
        raise RenderError(
            "template_dropped", f"{where}: reasoning='keep' but the chat template did not render the reasoning"
        )
