"""One definition of a think block, shared by rendering and by the environments' answer scoring."""

from __future__ import annotations

import pytest

from apprentice.envs.trajectory import answer_text
from apprentice.render.reasoning import apply_reasoning, reasoning_of, split_think, strip_think


@pytest.mark.parametrize(
    ("content", "reasoning", "answer", "closed"),
    [
        ("<think>a</think> Paris", "a", "Paris", True),
        ("</think> Paris", "", "Paris", True),  # the prompt opened the block; the model only closed it
        ("17 * 23 is 391</think>\n\n391", "17 * 23 is 391", "391", True),
        ("<think>cut off", "cut off", "", False),  # an unclosed block runs to the end
        ("  <think>\nx\n</think>\n\nA", "\nx\n", "A", True),
        ("Paris", None, "Paris", True),
        ("Use <think> tags like this.", None, "Use <think> tags like this.", True),  # not at the start: text
    ],
)
def test_split_think(content: str, reasoning: str | None, answer: str, closed: bool) -> None:
    assert split_think(content) == (reasoning, answer, closed)
    assert strip_think(content) == answer
    # Scoring uses the same definition (answer_text strips the surrounding whitespace as well).
    assert answer_text({"role": "assistant", "content": content}) == answer.strip()


def test_reasoning_of_and_policy() -> None:
    message = {"role": "assistant", "content": "Paris", "reasoning_content": "capital"}
    assert reasoning_of(message) == "capital"
    assert reasoning_of({"role": "assistant", "content": "<think>x</think>y"}) == "x"
    folded = apply_reasoning(message, "keep", template_reads=False)
    assert folded == {"role": "assistant", "content": "<think>\ncapital\n</think>\n\nParis"}
    assert apply_reasoning(message, "keep", template_reads=True) is message
    assert apply_reasoning({"role": "assistant", "content": "</think> Paris"}, "drop", False)["content"] == "Paris"
    assert "reasoning_content" not in apply_reasoning(message, "drop", template_reads=True)
