"""The `reverse-text` environment: reverse a short random string; reward = character-level similarity.

Small enough that a tiny student learns it on CPU, and graded (not 0/1), so partial progress shows in the reward.
"""

from __future__ import annotations

import random
import string

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from apprentice.envs.base import EnvError, Task
from apprentice.envs.rewards import QUOTE_CHARACTERS, char_similarity, strip_wrapping
from apprentice.envs.single_turn import SingleTurnEnv

DEFAULT_SYSTEM_PROMPT = "Reverse the text you are given, character by character. Reply with the reversed text only."


class ReverseTextArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_tasks: int = Field(default=1000, ge=1, le=1_000_000)
    """Training tasks."""
    num_eval_tasks: int = Field(default=64, ge=0, le=100_000)
    """Held-out tasks (texts never seen in training)."""
    min_len: int = Field(default=5, ge=1, le=1000)
    """Shortest text, in characters."""
    max_len: int = Field(default=12, ge=1, le=1000)
    """Longest text, in characters."""
    alphabet: str = Field(default=string.ascii_lowercase, min_length=2)
    """Characters the texts are drawn from."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """The instruction sent as the system message."""
    name: str = Field(default="reverse-text", min_length=1)
    """Name in metrics."""
    seed: int | None = None
    """Seed of the generated texts; defaults to the run's seed."""

    @field_validator("alphabet")
    @classmethod
    def _plain_distinct_characters(cls, alphabet: str) -> str:
        # A repeated character made the count of distinct texts too high (generation then looped forever); a space
        # or a quote at either end of a text is stripped from the reply by the reward, so a right answer scored < 1.
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet {alphabet!r} repeats a character; list each character once")
        wrapping = sorted({c for c in alphabet if c.isspace() or c in QUOTE_CHARACTERS})
        if wrapping:
            raise ValueError(f"alphabet {alphabet!r} holds {wrapping}: whitespace and quote characters around a reply "
                             "are stripped before it is scored, so a text ending in one could never be matched")  # fmt: skip
        return alphabet

    @model_validator(mode="after")
    def _lengths(self) -> ReverseTextArgs:
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) must be <= max_len ({self.max_len})")
        return self


def generate_texts(n: int, args: ReverseTextArgs, rng: random.Random, exclude: set[str]) -> list[str]:
    """`n` distinct texts not in `exclude` (which is extended with them)."""
    capacity = sum(len(args.alphabet) ** k for k in range(args.min_len, args.max_len + 1))
    if n + len(exclude) > capacity:
        raise EnvError(
            f"reverse-text: only {capacity} distinct texts exist for min_len/max_len/alphabet, asked for "
            f"{n + len(exclude)} (num_tasks + num_eval_tasks); lower them or allow longer texts"
        )
    texts: list[str] = []
    while len(texts) < n:
        text = "".join(rng.choices(args.alphabet, k=rng.randint(args.min_len, args.max_len)))
        if text not in exclude:
            exclude.add(text)
            texts.append(text)
    return texts


def score_reverse(text: str, task: Task) -> tuple[float, dict[str, float]]:
    answer = strip_wrapping(text)
    similarity = char_similarity(answer, task.answer)
    return similarity, {"exact": float(answer == task.answer)}


def make_reverse_text_env(args: ReverseTextArgs, seed: int) -> SingleTurnEnv:
    rng = random.Random(args.seed if args.seed is not None else seed)
    seen: set[str] = set()
    # Train texts first, then eval texts from the same stream: the train set does not depend on num_eval_tasks.
    splits = {
        "train": generate_texts(args.num_tasks, args, rng, seen),
        "eval": generate_texts(args.num_eval_tasks, args, rng, seen),
    }
    tasks = {
        split: [
            Task(
                id=f"{split}-{i}",
                prompt=[{"role": "system", "content": args.system_prompt}, {"role": "user", "content": text}],
                answer=text[::-1],
            )
            for i, text in enumerate(texts)
        ]
        for split, texts in splits.items()
    }
    return SingleTurnEnv(args.name, tasks["train"], tasks["eval"], score_reverse)
