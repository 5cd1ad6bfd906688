"""One question, one answer: the rollout shared by the `prompts` and `reverse-text` environments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from apprentice.clients.base import ChatClient
from apprentice.envs.base import Split, Task
from apprentice.envs.reward_check import reward_function
from apprentice.envs.trajectory import answer_text, assistant_message, make_step, make_trajectory
from apprentice.trajectory import Trajectory

ScoreFn = Callable[[str, Task], tuple[float, dict[str, float]]]
"""(answer text without think blocks, task) -> (reward, metrics with bare names)."""


class SingleTurnEnv:
    """An environment whose episode is a single model turn scored by `score`."""

    tools: list[dict[str, Any]] | None = None

    def __init__(self, name: str, train: list[Task], eval: list[Task], score: ScoreFn) -> None:
        self.name = name
        self._splits: dict[str, list[Task]] = {"train": train, "eval": eval}
        self._score = score

    def tasks(self, split: Split) -> list[Task]:
        if split not in self._splits:
            raise ValueError(f"environment {self.name!r}: unknown split {split!r}; use 'train' or 'eval'")
        return list(self._splits[split])

    async def rollout(self, task: Task, client: ChatClient, key: str) -> Trajectory:
        prompt = [dict(m) for m in task.prompt]
        response = await client.chat(prompt, tools=None, key=f"{key}/turn-0")
        message = assistant_message(response, turn=0)
        with reward_function(f"of environment {self.name!r}"):
            reward, metrics = self._score(answer_text(message), task)
        return make_trajectory(
            env=self.name,
            task_id=task.id,
            steps=[make_step(prompt, [message], response)],
            tools=None,
            reward=reward,
            metrics={"num_turns": 1.0, **metrics},
            truncated=response.finish_reason == "length",
        )
