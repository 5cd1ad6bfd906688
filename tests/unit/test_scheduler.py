"""The orchestrator's task schedule: deterministic per step, weighted, whole epochs before repeats."""

from __future__ import annotations

from collections import Counter

from apprentice.envs.base import Task
from apprentice.orchestrator.scheduler import TaskScheduler


class ListEnv:
    """A minimal environment with a fixed task list (rollout is not needed for scheduling)."""

    tools = None

    def __init__(self, name: str, n: int) -> None:
        self.name = name
        self._tasks = [Task(id=f"{name}-{i}", prompt=[{"role": "user", "content": str(i)}]) for i in range(n)]

    def tasks(self, split: str) -> list[Task]:
        return self._tasks

    async def rollout(self, task, client, key):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def ids(scheduler: TaskScheduler, step: int) -> list[str]:
    return [f"{s.task.id}#{s.sample}" for s in scheduler.step(step)]


def test_same_step_same_tasks_across_fresh_schedulers() -> None:
    envs = [ListEnv("a", 7), ListEnv("b", 5)]
    first = TaskScheduler(envs, [1.0, 1.0], tasks_per_step=4, rollouts_per_prompt=2, seed=3)
    second = TaskScheduler(envs, [1.0, 1.0], tasks_per_step=4, rollouts_per_prompt=2, seed=3)
    # A resumed orchestrator asks for step 9 without ever computing steps 1..8 in the same order.
    expected = [ids(first, s) for s in range(1, 10)]
    assert ids(second, 9) == expected[8]
    assert [ids(second, s) for s in range(1, 10)] == expected
    other_seed = TaskScheduler(envs, [1.0, 1.0], tasks_per_step=4, rollouts_per_prompt=2, seed=4)
    assert [ids(other_seed, s) for s in range(1, 10)] != expected


def test_rollouts_per_prompt_repeat_each_task() -> None:
    scheduler = TaskScheduler([ListEnv("a", 10)], [1.0], tasks_per_step=3, rollouts_per_prompt=4, seed=0)
    slots = scheduler.step(1)
    assert len(slots) == 12
    for group in range(3):
        members = slots[group * 4 : group * 4 + 4]
        assert len({s.task.id for s in members}) == 1
        assert [s.sample for s in members] == [0, 1, 2, 3]


def test_every_task_once_per_epoch() -> None:
    scheduler = TaskScheduler([ListEnv("a", 10)], [1.0], tasks_per_step=5, rollouts_per_prompt=1, seed=1)
    epoch1 = [s.task.id for step in (1, 2) for s in scheduler.step(step)]
    epoch2 = [s.task.id for step in (3, 4) for s in scheduler.step(step)]
    assert sorted(epoch1) == sorted(f"a-{i}" for i in range(10))
    assert sorted(epoch2) == sorted(epoch1)
    assert epoch1 != epoch2  # a fresh permutation per epoch


def test_weights_set_the_mix() -> None:
    scheduler = TaskScheduler([ListEnv("a", 50), ListEnv("b", 50)], [3.0, 1.0], tasks_per_step=100, rollouts_per_prompt=1, seed=0)
    counts = Counter(s.task.id.split("-")[0] for step in range(1, 11) for s in scheduler.step(step))
    assert 0.70 < counts["a"] / 1000 < 0.80
