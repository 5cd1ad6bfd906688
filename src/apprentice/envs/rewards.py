"""Reward functions of the built-in environments: pure functions of the answer text and the reference."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}
QUOTE_CHARACTERS = frozenset(_QUOTE_PAIRS) | frozenset(_QUOTE_PAIRS.values())
"""Characters `strip_wrapping` may remove around a reply."""
_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


@dataclass(frozen=True)
class MatchOptions:
    ignore_case: bool = True
    """Compare case-insensitively (exact/contains) or with re.IGNORECASE (regex)."""
    normalize_whitespace: bool = True
    """Strip both ends and collapse runs of whitespace to one space before comparing (exact/contains)."""


def normalize(text: str, opts: MatchOptions) -> str:
    if opts.normalize_whitespace:
        text = " ".join(text.split())
    return text.casefold() if opts.ignore_case else text


def exact_match(text: str, answer: str, opts: MatchOptions) -> float:
    """1.0 when the answer text equals the reference (after normalisation), else 0.0."""
    return float(normalize(text, opts) == normalize(answer, opts))


def contains_match(text: str, answer: str, opts: MatchOptions) -> float:
    """1.0 when the reference occurs in the answer text (after normalisation), else 0.0."""
    return float(normalize(answer, opts) in normalize(text, opts))


def regex_match(text: str, pattern: str, opts: MatchOptions) -> float:
    """1.0 when the reference, read as a Python regular expression, matches anywhere in the answer text."""
    return float(re.search(pattern, text, re.IGNORECASE if opts.ignore_case else 0) is not None)


Matcher = Callable[[str, str, MatchOptions], float]
MATCHERS: dict[str, Matcher] = {"exact": exact_match, "contains": contains_match, "regex": regex_match}
"""The `reward` choices of the prompts environment ("none" means no reward function)."""


def strip_wrapping(text: str) -> str:
    """Remove surrounding whitespace and matching quotes/backticks ('"olleh"' -> 'olleh'), repeatedly."""
    text = text.strip()
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_similarity(text: str, target: str) -> float:
    """1 - levenshtein / max length: 1.0 for identical strings, 0.0 for nothing in common."""
    longest = max(len(text), len(target))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(text, target) / longest


def numbers_in(text: str) -> list[float]:
    """Every number written in `text` ("1,234.5" -> 1234.5; "-7" -> -7.0), in order."""
    return [float(m.group().replace(",", "")) for m in _NUMBER_RE.finditer(text)]


def contains_number(text: str, target: float, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> bool:
    """True when any number written in `text` equals `target` within the tolerances."""
    return any(math.isclose(x, target, rel_tol=rel_tol, abs_tol=abs_tol) for x in numbers_in(text))
