"""The teacher-side sequence of one student turn: the conversation in the teacher's own chat template, then the
student's completion text as the teacher's tokenizer writes it, then the teacher's end-of-turn token.

    prompt    teacher_template(conversation up to the turn, generation prompt), tokenized as a whole
    text      the student's completion as bytes (its sampled tokens' exact bytes, end of turn left out)
    ids       tok_T(prompt) + the teacher's tokens of `text` as a continuation of the prompt + [teacher end of turn]

The continuation is tokenized the way the teacher would have generated it (render/align.py's `Tokens`): from
the prompt's last added token on, so a BPE merge across the generation prompt's last newline cannot shift the
completion's first byte into the prompt. Turns that cannot be compared are refused with a kind (AlignError),
counted as distill/set_aside/<kind> by the caller:

    invalid_utf8        the student's tokens are not UTF-8 text (bytes that form no character)
    control_token       the text holds the teacher's control-token text (it would be read as a turn marker)
    tool_call_text      a tool call (or reasoning) the teacher's template writes as other text than the student's
    teacher_template    the teacher's chat template refuses the conversation
    text_mismatch       the teacher's tokenizer cannot write the text byte for byte (a normalizer, a missing byte)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from apprentice.crosstok.align import AlignError
from apprentice.crosstok.token_bytes import TokenBytes
from apprentice.render.align import Tokens


@dataclass(frozen=True)
class TeacherTurn:
    ids: list[int]
    """[P + C] the teacher's prompt then its tokens of the completion (its end-of-turn token last, if the turn ended)."""
    completion_start: int
    """P: index in `ids` of the completion's first token."""
    ends_turn: bool
    student_scored: int
    """How many of the student's completion tokens the teacher's sequence covers: all of them, except in a turn
    cut off by max_tokens inside a character, whose last few tokens (the unfinished character) are left out."""


def find_end_of_turn(tokenizer: Any) -> int:
    """The teacher's end-of-turn token: the first special token its template writes after an assistant reply
    (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>), else its eos token."""
    marker = "Xq7 reply"
    specials = {int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)  # fmt: skip
        after = str(text).rsplit(marker, 1)[1]
        for token in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token in specials:
                return int(token)
    except Exception:  # a template that needs other roles: fall back to the eos token
        pass
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{tokenizer.name_or_path}: cannot find the teacher's end-of-turn token (no eos token either)")
    return int(tokenizer.eos_token_id)


class TeacherSide:
    """Builds teacher-side sequences for one (teacher tokenizer, student tokenizer) pair."""

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any) -> None:
        self.tok = teacher_tokenizer
        self.teacher_bytes = TokenBytes(teacher_tokenizer)
        self.student_bytes = TokenBytes(student_tokenizer)
        self.tokens = Tokens(teacher_tokenizer)
        self.end_of_turn = find_end_of_turn(teacher_tokenizer)
        self.student_special = {int(i) for i, t in student_tokenizer.added_tokens_decoder.items() if t.special}
        self.teacher_control = sorted(
            {t.content for t in teacher_tokenizer.added_tokens_decoder.values() if t.special and t.content}
        )

    def student_text(self, completion_ids: list[int]) -> tuple[str, bool, int]:
        """(the completion's text, whether its last token ends the turn (a special token of the student's), how
        many of its tokens that text covers). A turn cut off inside a character drops the unfinished character's
        tokens (at most 3 bytes); other bytes that are not UTF-8 raise AlignError("invalid_utf8")."""
        ends_turn = bool(completion_ids) and completion_ids[-1] in self.student_special
        pieces = self.student_bytes(completion_ids[: len(completion_ids) - int(ends_turn)])
        raw = b"".join(pieces)
        n, kept = len(pieces), raw
        while True:
            try:
                text = kept.decode("utf-8")
                break
            except UnicodeDecodeError as e:
                # Only a cut-off turn may end inside a character, and only its last character is unfinished.
                if ends_turn or n == 0 or e.start < len(kept) - 3 or e.reason != "unexpected end of data":
                    raise AlignError("invalid_utf8", "the student's tokens are not UTF-8 text") from None
                n -= 1
                kept = b"".join(pieces[:n])
        for control in self.teacher_control:
            if control in text:
                raise AlignError("control_token", f"the student's text holds the teacher's control token {control!r}")
        return text, ends_turn, n + int(ends_turn)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, *, generation: bool) -> str:
        try:
            return str(self.tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False))
        except Exception as e:  # jinja raises for conversations the template refuses
            raise AlignError("teacher_template", f"the teacher's chat template refused the conversation: {e}") from None

    def turn(
        self,
        prompt: list[dict[str, Any]],
        completion: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        student_completion_ids: list[int],
    ) -> TeacherTurn:
        """The teacher-side sequence of the student's turn (prompt messages, the parsed completion messages, the
        ids the student sampled). AlignError(kind) when the turn cannot be compared."""
        text, ends_turn, scored = self.student_text(student_completion_ids)
        prompt_text = self.render(prompt, tools, generation=True)
        message = completion[-1] if completion else {}
        if message.get("tool_calls") or message.get("reasoning_content"):
            # Structured parts: the teacher must see them as its own template writes them, which is only
            # comparable when that is the student's text.
            full = self.render(prompt + completion, tools, generation=False)
            if not (full.startswith(prompt_text) and full[len(prompt_text) :].startswith(text)):
                raise AlignError("tool_call_text", "the teacher's template writes this tool call (or reasoning) "
                                                   "as other text than the student's")  # fmt: skip
        prompt_ids = list(self.tok(prompt_text, add_special_tokens=False)["input_ids"])
        completion_ids, _ = self.tokens.continuation(prompt_text, text)
        ids = prompt_ids + completion_ids + ([self.end_of_turn] if ends_turn else [])
        return TeacherTurn(ids=ids, completion_start=len(prompt_ids), ends_turn=ends_turn, student_scored=scored)
