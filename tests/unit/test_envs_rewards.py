"""Reward functions and the safe calculator of the built-in environments."""

from __future__ import annotations

import pytest

from apprentice.envs.calculator import CalculatorError, evaluate, format_number
from apprentice.envs.rewards import (
    MatchOptions,
    char_similarity,
    contains_match,
    contains_number,
    exact_match,
    levenshtein,
    numbers_in,
    regex_match,
    strip_wrapping,
)
from apprentice.envs.trajectory import answer_text


def test_levenshtein_and_similarity() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert char_similarity("olleh", "olleh") == 1.0
    assert char_similarity("", "") == 1.0
    assert char_similarity("xyz", "abc") == 0.0
    assert char_similarity("olleX", "olleh") == pytest.approx(0.8)
    # Longer answers are penalised: padding the right answer lowers the reward.
    assert char_similarity("olleh olleh", "olleh") < 0.5


def test_strip_wrapping_removes_whitespace_and_matching_quotes() -> None:
    assert strip_wrapping('  "olleh"\n') == "olleh"
    assert strip_wrapping("`'abc'`") == "abc"
    assert strip_wrapping("\u201cabc\u201d") == "abc"
    assert strip_wrapping('"abc') == '"abc'  # unmatched quote is content
    assert strip_wrapping('"') == '"'


def test_matchers_respect_options() -> None:
    loose, strict = MatchOptions(), MatchOptions(ignore_case=False, normalize_whitespace=False)
    assert exact_match("  Paris \n", "paris", loose) == 1.0
    assert exact_match("  Paris \n", "paris", strict) == 0.0
    assert exact_match("New   York", "new york", loose) == 1.0
    assert contains_match("The capital is PARIS.", "paris", loose) == 1.0
    assert contains_match("The capital is PARIS.", "paris", strict) == 0.0
    assert regex_match("The answer is 42.", r"\b42\b", loose) == 1.0
    assert regex_match("The answer is 420.", r"\b42\b", loose) == 0.0
    assert regex_match("YES", r"^yes$", loose) == 1.0
    assert regex_match("YES", r"^yes$", strict) == 0.0


def test_numbers_in_text() -> None:
    assert numbers_in("it is -7, then 1,234.5 and .5 or 3e2") == [-7.0, 1234.5, 0.5, 300.0]
    assert contains_number("The answer is 518.", 518)
    assert not contains_number("The answer is 5180.", 518)
    assert contains_number("about 0.3333333333", 1 / 3, rel_tol=1e-6)
    assert not contains_number("no numbers here", 0)


def test_answer_text_drops_think_blocks() -> None:
    msg = {"role": "assistant", "content": "<think>\n12 * 2 = 24? no, 25\n</think>\n\nThe answer is 26."}
    assert answer_text(msg) == "The answer is 26."
    assert answer_text({"role": "assistant", "content": "<think>unfinished"}) == ""
    assert answer_text({"role": "assistant", "content": None}) == ""


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("12 * (3 + 4)", 84),
        ("-3 + 2", -1),
        ("2 ** 10", 1024),
        ("2 ^ 3", 8),
        ("7 / 2", 3.5),
        ("+(1.5) * -2", -3.0),
        ("  (((1)))  ", 1),
    ],
)
def test_calculator_evaluates_arithmetic(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "unsupported syntax"),
        ("x + 1", "unsupported syntax"),
        ("'a' * 3", "unsupported syntax"),
        ("True + 1", "unsupported syntax"),
        ("1 / 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("9 ** 9 ** 9", "too large"),
        ("10 ** 20", "out of range"),
        ("(-8) ** 0.5", "no real value"),
        ("1 +", "cannot parse"),
        ("1" * 300, "longer than"),
        ("[1, 2]", "unsupported syntax"),
    ],
)
def test_calculator_refuses_unsafe_or_invalid_input(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


def test_format_number() -> None:
    assert format_number(84.0) == "84"
    assert format_number(-3) == "-3"
    assert format_number(3.5) == "3.5"
    assert format_number(1 / 3) == "0.333333333333"
