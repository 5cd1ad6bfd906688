"""Which tasks go into which step: seeded, deterministic, and a pure function of the step number.

Because step n's tasks depend only on (seed, n), a resumed orchestrator needs no saved sampler state: it
recomputes the same tasks for the next unwritten step, and the teacher cache answers the ones already paid for.

Slot i of the run (step-major) picks an environment by weight with its own seeded draw; the k-th slot given
to environment e takes task k of e's task list under a fresh seeded permutation per epoch, so every task is
seen once per epoch before any repeats.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from apprentice.envs.base import Environment, Task


@dataclass(frozen=True)
class Slot:
    env_index: int
    task: Task
    sample: int
    """Index of this sample among the rollouts_per_prompt samples of the task."""


class TaskScheduler:
    def __init__(self, envs: list[Environment], weights: list[float], tasks_per_step: int, rollouts_per_prompt: int, seed: int) -> None:
        self.envs = envs
        self.tasks = [env.tasks("train") for env in envs]
        for env, tasks in zip(envs, self.tasks, strict=True):
            if not tasks:
                raise ValueError(f"environment {env.name!r} has no training tasks")
        self.weights = weights
        self.tasks_per_step = tasks_per_step
        self.rollouts_per_prompt = rollouts_per_prompt
        self.seed = seed
        self._env_of_slot: list[int] = []
        self._rank_in_env: list[int] = []  # slot -> how many earlier slots went to the same environment
        self._seen = [0] * len(envs)
        self._perm_cache: dict[tuple[int, int], list[int]] = {}

    def _assign(self, slot: int) -> tuple[int, int]:
        """(environment index, k-th use of that environment) of a slot; extends the memo up to `slot`."""
        while len(self._env_of_slot) <= slot:
            rng = random.Random(f"{self.seed}/env/{len(self._env_of_slot)}")
            env_index = rng.choices(range(len(self.envs)), weights=self.weights)[0]
            self._env_of_slot.append(env_index)
            self._rank_in_env.append(self._seen[env_index])
            self._seen[env_index] += 1
        return self._env_of_slot[slot], self._rank_in_env[slot]

    def _permutation(self, env_index: int, epoch: int) -> list[int]:
        key = (env_index, epoch)
        if key not in self._perm_cache:
            order = list(range(len(self.tasks[env_index])))
            random.Random(f"{self.seed}/perm/{env_index}/{epoch}").shuffle(order)
            self._perm_cache[key] = order
        return self._perm_cache[key]

    def step(self, step: int) -> list[Slot]:
        """The rollouts of step `step` (1-based): tasks_per_step tasks, each repeated rollouts_per_prompt times."""
        first = (step - 1) * self.tasks_per_step
        slots: list[Slot] = []
        for slot in range(first, first + self.tasks_per_step):
            env_index, k = self._assign(slot)
            tasks = self.tasks[env_index]
            task = tasks[self._permutation(env_index, k // len(tasks))[k % len(tasks)]]
            slots.extend(Slot(env_index, task, sample) for sample in range(self.rollouts_per_prompt))
        return slots
