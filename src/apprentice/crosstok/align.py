"""Align two tokenizations of one completion by bytes, and turn the teacher's scores into per-token values.

The student sampled tokens s_1..s_n of a completion; the teacher tokenized the same completion text as t_1..t_m.
Both are cut at byte offsets of the same byte string. A *chunk* is a span between two consecutive offsets where
both tokenizations have a boundary: inside it the two sides tokenize the same bytes differently, so only the
chunk's total is comparable. Per chunk c:

    value_c = sum of teacher logprobs of its teacher tokens - sum of student logprobs of its student tokens

which is the log-ratio of the two models' probabilities of that stretch of text, given everything before it
(each side after its own rendering of the conversation and of the text so far). The end of turn is one more
chunk: the student's end-of-turn token against the teacher's. Summed over the chunks, the values are
log p_teacher(completion text) - log p_student(completion text) exactly.

How a chunk's value is spread over its k student tokens (`spread`, `[orchestrator.teacher_model] spread`): each
rule is a set of weights over the chunk's student tokens that sums to 1, so every rule keeps the sum exactly.
- "even": 1/k each. Keeps the per-token scale of the same-tokenizer estimator (q_t - s_t) instead of piling a
  several-token log-ratio onto one token.
- "last": the whole value on the chunk's last student token (the token that completes the chunk's text).
- "first": the whole value on the chunk's first student token (the choice that entered the chunk).
- "surprisal": in proportion to each token's own surprisal, s_i / sum(s) (the even split when the chunk's
  student logprobs are all 0): equivalently q_i = T * s_i / S, the teacher's chunk logprob T split in the proportions
  the student's S is, so a token the student was sure of (s_i ~ 0) gets almost nothing and the value lands
  where the student spent its probability.
Most chunks are one token on each side (the tokenizers agree on common words), where every rule is the same;
the rules differ only on chunks of several student tokens (counted per step as `distill/multi_token_chunks`,
the share of scored student tokens in such chunks). docs/distillation.md has the experiment that chose the
default.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, get_args

Spread = Literal["even", "last", "first", "surprisal"]
SPREADS: tuple[Spread, ...] = get_args(Spread)


def _even(lps: list[float]) -> list[float]:
    return [1.0 / len(lps)] * len(lps)


def _surprisal(lps: list[float]) -> list[float]:
    total = -sum(lps)
    return [-lp / total for lp in lps] if total > 0.0 else _even(lps)


_WEIGHTS: dict[str, Callable[[list[float]], list[float]]] = {
    "even": _even,
    "last": lambda lps: [0.0] * (len(lps) - 1) + [1.0],
    "first": lambda lps: [1.0] + [0.0] * (len(lps) - 1),
    "surprisal": _surprisal,
}


def spread_weights(student_logprobs: list[float], spread: Spread) -> list[float]:
    """[k] the share of a chunk's value each of its k >= 1 student tokens gets (sums to 1; module docstring)."""
    return _WEIGHTS[spread](student_logprobs)


class AlignError(ValueError):
    """The two sides cannot be aligned; `kind` names why (counted as distill/set_aside/<kind>)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Chunk:
    """Student tokens [s_start, s_end) and teacher tokens [t_start, t_end) that cover the same bytes."""

    s_start: int
    s_end: int
    t_start: int
    t_end: int


def chunks(student: list[bytes], teacher: list[bytes]) -> list[Chunk]:
    """The chunks of two tokenizations of the same bytes (each list: one bytes object per token, in order).

    A token that stands for no bytes joins the chunk it starts in (the next one, at a boundary; the last
    chunk at the very end). AlignError("text_mismatch") when the two byte strings differ.
    """
    s_text, t_text = b"".join(student), b"".join(teacher)
    if s_text != t_text:
        at = next(
            (i for i, (a, b) in enumerate(zip(s_text, t_text, strict=False)) if a != b), min(len(s_text), len(t_text))
        )
        raise AlignError("text_mismatch", f"the two tokenizations are of different bytes (first difference at byte "
                                          f"{at}: {s_text[at:at + 12]!r} vs {t_text[at:at + 12]!r})")  # fmt: skip
    s_ends = list(accumulate((len(b) for b in student), initial=0))
    t_ends = list(accumulate((len(b) for b in teacher), initial=0))
    cuts = sorted(set(s_ends) & set(t_ends))  # always holds 0 and the total length
    if len(cuts) == 1:  # no bytes at all: one chunk holding whatever tokens there are
        return [Chunk(0, len(student), 0, len(teacher))] if student or teacher else []
    n = len(cuts) - 1

    def owner(starts: list[int]) -> list[int]:
        return [min(bisect_right(cuts, start) - 1, n - 1) for start in starts]

    s_owner, t_owner = owner(s_ends[:-1]), owner(t_ends[:-1])
    out: list[Chunk] = []
    s = t = 0
    for c in range(n):
        s0, t0 = s, t
        while s < len(student) and s_owner[s] == c:
            s += 1
        while t < len(teacher) and t_owner[t] == c:
            t += 1
        out.append(Chunk(s0, s, t0, t))
    return out


def token_values(
    student_logprobs: list[float], teacher_logprobs: list[float], parts: list[Chunk], *, spread: Spread = "even"
) -> list[float]:
    """[n] per student token: its share of (teacher - student) logprob of its chunk. sum = sum(teacher) - sum(student)."""
    values = [0.0] * len(student_logprobs)
    for c in parts:
        if c.s_end == c.s_start:
            raise AlignError("empty_chunk", f"chunk {c} has no student token to carry its value")
        student = student_logprobs[c.s_start : c.s_end]
        value = sum(teacher_logprobs[c.t_start : c.t_end]) - sum(student)
        for i, weight in enumerate(spread_weights(student, spread)):
            values[c.s_start + i] = value * weight
    return values


@dataclass(frozen=True)
class Completion:
    """One side of a completion: its tokens' bytes and logprobs, and whether the last token is the end of turn."""

    token_bytes: list[bytes]
    logprobs: list[float]
    ends_turn: bool


def completion_chunks(student: Completion, teacher: Completion) -> list[Chunk]:
    """The chunks of a completion, end of turn included: the end-of-turn tokens are matched with each other (one
    chunk of their own); the text before them is aligned by bytes. AlignError when one side ends the turn and
    the other does not, or the texts differ."""
    if len(student.token_bytes) != len(student.logprobs) or len(teacher.token_bytes) != len(teacher.logprobs):
        raise ValueError("each side needs one logprob per token")
    if student.ends_turn != teacher.ends_turn:
        raise AlignError("end_of_turn", "one side ends the turn and the other does not")
    cut_s = len(student.token_bytes) - int(student.ends_turn)
    cut_t = len(teacher.token_bytes) - int(teacher.ends_turn)
    parts = chunks(student.token_bytes[:cut_s], teacher.token_bytes[:cut_t])
    if student.ends_turn:
        parts.append(Chunk(cut_s, cut_s + 1, cut_t, cut_t + 1))
    return parts


def align_completion(student: Completion, teacher: Completion, *, spread: Spread = "even") -> list[float]:
    """[len(student)] per-token values (teacher minus student logprob, chunk by chunk, spread by `spread`)
    whose sum is the teacher's minus the student's logprob of the completion text, end of turn included."""
    return token_values(student.logprobs, teacher.logprobs, completion_chunks(student, teacher), spread=spread)
