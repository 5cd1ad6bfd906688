"""A toy environment a randomly initialised tiny model can learn on CPU in a few RL steps (tests, `--tiny` demo).

Reward = the share of the answer's characters that are in `letters`. A random policy already emits some of
them, with spread across the samples of one prompt, so group advantages carry signal from the first step;
raising the logits of tokens rich in those letters raises the reward. It tests the RL machinery, not language.
"""

from __future__ import annotations

from apprentice.envs.base import Task
from apprentice.envs.single_turn import SingleTurnEnv


def make_letters_env(letters: str = "a", num_tasks: int = 64, num_eval_tasks: int = 8, name: str = "letters") -> SingleTurnEnv:
    def score(text: str, task: Task) -> tuple[float, dict[str, float]]:
        return (sum(c in letters for c in text) / len(text) if text else 0.0), {"length": float(len(text))}

    def task(split: str, i: int) -> Task:
        return Task(id=f"{split}-{i}", prompt=[{"role": "user", "content": f"Say something about {i}."}])

    return SingleTurnEnv(name, [task("train", i) for i in range(num_tasks)],
                         [task("eval", i) for i in range(num_eval_tasks)], score)  # fmt: skip
