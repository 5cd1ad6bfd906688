"""Teacher logprobs are checked where they enter, before anything is written or cached.

A logprob a teacher returns is accepted when it is a finite real number in [MIN_TEACHER_LOGPROB, 1e-6]
(1e-6 above 0 tolerates rounding). Anything else is a `BadLogprob` with a kind, counted as
`distill/set_aside/<kind>` (scoring) or `teacher/errors/<kind>` (chat top_logprobs), and never cached:

  - `nonfinite_logprob`: NaN, +-Infinity (Python's json reads `-Infinity` and `NaN` without complaint);
  - `absurd_logprob`: above 0 (a probability over 1) or below the floor.

The floor, MIN_TEACHER_LOGPROB = -1000 (a probability of e^-1000): log_softmax of float32 or bfloat16 logits of
any real model stays far above it (its most negative value is about minus the spread of the logits, tens to a
few hundred), so a value below it is not a score but a sentinel or garbage: vLLM writes -9999.0 where the true
value is -inf (a token the teacher gives probability 0), and a broken server may send -1e30. Trained on, one such
value makes a per-token advantage of ~1e4..1e30 (the rl loss) or a target no student can match (the distill
loss), and the run stops with a non-finite loss; cached, it would do so again on every rerun.
"""

from __future__ import annotations

import math
from typing import Any

MIN_TEACHER_LOGPROB = -1000.0
"""Lowest teacher logprob accepted (natural log); see the module docstring for why."""
MAX_TEACHER_LOGPROB = 1e-6
"""Highest accepted: 0 plus rounding."""


class BadLogprob(ValueError):
    """A teacher logprob that must not be trained on or cached; `kind` is the metric suffix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_logprob(value: Any, where: str) -> float:
    """`value` as a float (at most 0: rounding above it is clamped) when it is a usable teacher logprob;
    `BadLogprob` (or ValueError if not a number)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{where} holds {value!r}, not a logprob")
    number = float(value)
    if not math.isfinite(number):
        raise BadLogprob("nonfinite_logprob", f"{where} holds {number!r}: the teacher's logprobs must be finite")
    if number > MAX_TEACHER_LOGPROB or number < MIN_TEACHER_LOGPROB:
        raise BadLogprob(
            "absurd_logprob",
            f"{where} holds {number!r}, outside [{MIN_TEACHER_LOGPROB:g}, 0]: not a logprob a model computes "
            f"(vLLM writes -9999 for a probability of 0)",
        )
    return min(number, 0.0)


def usable_logprob(value: Any) -> bool:
    """Whether a stored value would pass `check_logprob` (cache entries are data from disk, checked again)."""
    try:
        check_logprob(value, "")
    except ValueError:
        return False
    return True


def _token_bytes(entry: dict[str, Any], where: str) -> list[int]:
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in raw):
        return list(raw)
    if raw is not None:
        raise ValueError(f"{where}.bytes is not a list of byte values")
    token = entry.get("token")
    if not isinstance(token, str):
        raise ValueError(f"{where} has neither bytes nor a token string")
    return list(token.encode("utf-8", errors="surrogatepass"))


def parse_token_logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    """A chat choice's `logprobs` (OpenAI shape) as `ChatResponse.token_logprobs`; None when the server sent none.

    OpenAI shape: {"content": [{"token": str, "logprob": float, "bytes": [int] | null,
    "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}. `bytes` is the token's UTF-8 (a token that is
    part of a multi-byte character has bytes that are not UTF-8 alone); where it is null, the token string's.
    """
    if logprobs is None:
        return None
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if content is None:
        return None
    if not isinstance(content, list):
        raise ValueError("logprobs.content is not a list")
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(content):
        where = f"logprobs.content[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object")
        top = entry.get("top_logprobs") or []
        if not isinstance(top, list) or not all(isinstance(t, dict) for t in top):
            raise ValueError(f"{where}.top_logprobs is not a list of objects")
        pairs = [(_token_bytes(t, f"{where}.top_logprobs[{j}]"), check_logprob(t.get("logprob"), f"{where}.top_logprobs[{j}].logprob"))
                 for j, t in enumerate(top)]  # fmt: skip
        alternatives = [[b, lp] for b, lp in sorted(pairs, key=lambda pair: -pair[1])]
        out.append({"bytes": _token_bytes(entry, where), "logprob": check_logprob(entry.get("logprob"), f"{where}.logprob"),
                    "top": alternatives})  # fmt: skip
    return out


def token_logprobs_problem(value: Any) -> str | None:
    """What is wrong with stored `token_logprobs` (None or the list `parse_token_logprobs` returns), or None."""
    if value is None:
        return None
    if not isinstance(value, list):
        return "has token_logprobs that are not a list"
    for entry in value:
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), list) and usable_logprob(entry.get("logprob"))
                and isinstance(entry.get("top"), list)):  # fmt: skip
            return "has a token_logprobs entry without bytes, a usable logprob and top alternatives"
        for pair in entry["top"]:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], list) and usable_logprob(pair[1])):
                return "has a top alternative that is not [bytes, usable logprob]"
    return None
