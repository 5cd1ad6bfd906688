"""The continuous producer on toy environments: order, bounded concurrency, overlap, backpressure, the rl seam."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from apprentice.envs.base import Task
from apprentice.envs.trajectory import make_trajectory
from apprentice.orchestrator.producer import Producer, StepRollouts
from apprentice.orchestrator.scheduler import TaskScheduler
from apprentice.trajectory import Trajectory


class SleepyEnv:
    """Each rollout sleeps for a delay given by its task (the slow ones finish last) and records what ran when."""

    tools = None

    def __init__(self, delays: dict[str, float]) -> None:
        self.name = "sleepy"
        self._tasks = [Task(id=str(i), prompt=[{"role": "user", "content": str(i)}]) for i in range(len(delays))]
        self.delays = delays
        self.running = 0
        self.max_running = 0
        self.log: list[tuple[str, str]] = []  # ("start" | "end", key)

    def tasks(self, split: str) -> list[Task]:
        return self._tasks

    async def rollout(self, task: Task, client: Any, key: str) -> Trajectory:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.log.append(("start", key))
        try:
            await asyncio.sleep(self.delays[task.id])
        finally:
            self.running -= 1
        self.log.append(("end", key))
        return make_trajectory(env=self.name, task_id=task.id, steps=[], tools=None, reward=1.0, metrics={"key": 0.0}, truncated=False) | {"key": key}  # type: ignore[return-value]


class NoWait:
    def __init__(self) -> None:
        self.opened: list[int] = []

    async def wait(self, step: int) -> float:
        self.opened.append(step)
        return 0.0


def producer(env: SleepyEnv, tasks_per_step: int, max_concurrency: int, **kwargs: Any) -> Producer:
    scheduler = TaskScheduler([env], [1.0], tasks_per_step, 1, seed=0)  # type: ignore[list-item]
    return Producer([env], scheduler, client=None, max_concurrency=max_concurrency, **kwargs)  # type: ignore[arg-type]


async def collect(p: Producer, first: int, last: int) -> list[StepRollouts]:
    out = []
    async for done in p.steps(first, last):
        out.append(done)
    return out


def test_steps_come_in_order_with_slot_order_while_slots_flow_across_steps() -> None:
    # One slow task: under a step-by-step loop it would idle every other slot; here later steps proceed.
    delays = {str(i): (0.3 if i == 0 else 0.01) for i in range(16)}
    env = SleepyEnv(delays)
    p = producer(env, tasks_per_step=4, max_concurrency=3, backpressure=NoWait())
    steps = asyncio.run(collect(p, 1, 4))
    assert [s.step for s in steps] == [1, 2, 3, 4]
    scheduler = TaskScheduler([env], [1.0], 4, 1, seed=0)  # type: ignore[list-item]
    for done in steps:
        assert [t["task_id"] for t in done.trajectories] == [s.task.id for s in scheduler.step(done.step)]
        assert all(t["policy_step"] == 0 for t in done.trajectories)
    assert env.max_running == 3  # bounded, and the bound was used
    def step_of(key: str) -> int:
        return int(key.split("/")[0].removeprefix("step"))

    slow = next(k for e, k in env.log if e == "start" and k.endswith("/0/sample0"))
    assert step_of(slow) < 4
    slow_end = env.log.index(("end", slow))
    assert any(e == "start" and step_of(k) > step_of(slow) for e, k in env.log[:slow_end]), (
        "no rollout of a later step started while the slow one ran"
    )


def test_a_step_opens_only_when_the_backpressure_allows() -> None:
    class Gate:
        def __init__(self) -> None:
            self.open_after = 1
            self.released = asyncio.Event()

        async def wait(self, step: int) -> float:
            if step > self.open_after:
                await self.released.wait()
            return 0.0

    env = SleepyEnv({str(i): 0.01 for i in range(8)})

    async def drive() -> list[int]:
        gate = Gate()
        p = producer(env, tasks_per_step=2, max_concurrency=4, backpressure=gate)
        seen = []
        async for done in p.steps(1, 3):
            seen.append(done.step)
            if done.step == 1:
                await asyncio.sleep(0.1)
                assert not any(k.startswith("step2/") for _, k in env.log), "step 2 started before the trainer allowed it"
                gate.released.set()
        return seen

    assert asyncio.run(drive()) == [1, 2, 3]


def test_rl_seam_tags_the_policy_step_and_reruns_rollouts_the_policy_rejects() -> None:
    class EveryOtherPolicy:
        """Advances one policy step per rollout; rejects rollouts sampled at an odd policy step."""

        def __init__(self) -> None:
            self.version = 0
            self.waits = 0

        async def ready(self) -> None:
            self.waits += 1

        def policy_step(self) -> int:
            self.version += 1
            return self.version

        def keep(self, policy_step: int, batch_step: int) -> bool:
            return policy_step % 2 == 0

    env = SleepyEnv({str(i): 0.0 for i in range(4)})
    policy = EveryOtherPolicy()
    steps = asyncio.run(collect(producer(env, tasks_per_step=2, max_concurrency=1, backpressure=NoWait(), policy=policy), 1, 2))
    trajectories = [t for s in steps for t in s.trajectories]
    assert all(t["policy_step"] % 2 == 0 for t in trajectories) and sum(s.discarded for s in steps) == 4
    assert policy.waits == 8  # sampling waited on the policy before every attempt
    assert all(t["key"].endswith("/redo1") for t in trajectories)  # type: ignore[typeddict-item]  # a redo gets its own cache key


def test_an_environment_bug_surfaces_with_its_own_exception() -> None:
    class Broken(SleepyEnv):
        async def rollout(self, task: Task, client: Any, key: str) -> Trajectory:
            raise KeyError("bug in the environment")

    env = Broken({str(i): 0.0 for i in range(4)})
    with pytest.raises(KeyError, match="bug in the environment"):
        asyncio.run(collect(producer(env, tasks_per_step=2, max_concurrency=2, backpressure=NoWait()), 1, 2))
