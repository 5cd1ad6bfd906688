"""A trivially learnable environment for rl-mode tests: reward = share of the answer's characters that are "a".

A random tiny model emits "a" in a few percent of its characters, with spread across samples of one prompt,
so group advantages carry signal from the first step, and raising the logits of "a"-rich tokens (which a
policy gradient with a high learning rate does within a few steps) raises the reward.
"""

from __future__ import annotations

from apprentice.envs.base import Task
from apprentice.envs.single_turn import SingleTurnEnv


def score_letter_a(text: str, task: Task) -> tuple[float, dict[str, float]]:
    return (text.count("a") / len(text) if text else 0.0), {"length": float(len(text))}


def make_letter_env(num_tasks: int = 64, num_eval_tasks: int = 8, seed: int = 0) -> SingleTurnEnv:
    def task(split: str, i: int) -> Task:
        return Task(id=f"{split}-{i}", prompt=[{"role": "user", "content": f"Say something about {i}."}])

    return SingleTurnEnv("letter-a", [task("train", i) for i in range(num_tasks)],
                         [task("eval", i) for i in range(num_eval_tasks)], score_letter_a)  # fmt: skip
