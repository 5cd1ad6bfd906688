"""The bounded continuous producer: rollouts of several steps in flight at once, handed over in step order.

    admission (one task, in step order)                     rollout tasks (at most max_concurrency at once)
      step n opens once n - 1 - trainer_step <= max_async_level      each runs one episode of one slot
      slots of step n get rollout tasks as slots free up  ------>    result stored at the slot's index
                                                                     a step is complete when all its slots are
    steps(first, last) yields step n's trajectories once all of them are done, n = first, first + 1, ...

A slow rollout holds one of the max_concurrency slots, not the whole pool: while it runs, the other slots
take rollouts of the next steps the backpressure rule allows. Determinism is unchanged from a step-by-step
loop: step n's tasks come from `TaskScheduler.step(n)` (a pure function of (seed, n)), each rollout uses the
same cache key as before, and trajectories are handed over in slot order, so a step's batch does not depend on
which rollout finished first.

Stopping: a `SpendCapReached` raised by the client (or seen at admission) stops admission; steps whose
rollouts were all admitted before it still complete and are yielded, then `steps()` raises it. Requests in
flight at that point are left to finish (up to `drain_timeout_s`) so that their paid answers reach the cache.
Any other exception in a rollout is a bug: it is raised by `steps()` at once.

Seam for rl mode (`RolloutPolicy`): before each rollout the producer awaits `policy.ready()` (rl: not while
weights reload), tags the trajectory with `policy.policy_step()` (`trajectory["policy_step"]`, the weights that
generated it), and asks `policy.keep(policy_step, batch_step)` when it is done; a rollout it rejects (rl: older
than max_off_policy_steps) is discarded, counted in `StepRollouts.discarded`, and its slot is rolled out again
(with a distinct key). Distill mode uses `FixedPolicy`: policy step 0, never paused, nothing discarded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from apprentice.clients.base import ChatClient
from apprentice.envs.base import Environment
from apprentice.handoff.progress import read_trainer_progress
from apprentice.orchestrator.batch import is_reward_failure, rollout_one
from apprentice.orchestrator.metered import StepAccount, current_account
from apprentice.orchestrator.scheduler import Slot, TaskScheduler
from apprentice.orchestrator.spend import SpendCapReached, SpendLedger
from apprentice.trajectory import Trajectory

log = logging.getLogger("apprentice.orchestrator")


class Backpressure(Protocol):
    async def wait(self, step: int) -> float:
        """Return once step `step` may start; the seconds waited."""
        ...


class TrainerBackpressure:
    """Step n may start once n - 1 - (the trainer's last finished step) <= max_async_level."""

    def __init__(self, output_dir: Path, max_async_level: int, poll_s: float = 0.05) -> None:
        self.output_dir = output_dir
        self.max_async_level = max_async_level
        self.poll_s = poll_s

    async def wait(self, step: int) -> float:
        start = time.monotonic()
        announced = False
        while step - 1 - read_trainer_progress(self.output_dir) > self.max_async_level:
            if not announced:
                log.info("step %d: waiting for the trainer (max_async_level=%d)", step, self.max_async_level)
                announced = True
            await asyncio.sleep(self.poll_s)
        return time.monotonic() - start


class RolloutPolicy(Protocol):
    """Which policy samples, when it may, and which rollouts are still fresh enough (see the module docstring)."""

    async def ready(self) -> None:
        """Return when sampling may proceed (rl: not while the inference server reloads weights)."""
        ...

    def policy_step(self) -> int:
        """The trainer step of the weights now sampling (0 = the initial model)."""
        ...

    def keep(self, policy_step: int, batch_step: int) -> bool:
        """Whether a rollout sampled by `policy_step` may go into batch `batch_step`."""
        ...


class FixedPolicy:
    """Distill mode: the teacher never changes, never pauses, and every rollout is kept."""

    async def ready(self) -> None:
        return None

    def policy_step(self) -> int:
        return 0

    def keep(self, policy_step: int, batch_step: int) -> bool:
        return True


@dataclass
class StepRollouts:
    """A complete step as the producer hands it over."""

    step: int
    slots: list[Slot]
    trajectories: list[Trajectory]
    """In slot order (the order of `TaskScheduler.step(step)`), whatever order they finished in."""
    account: StepAccount
    """Responses, cache hits and usage of this step's rollouts."""
    opened_at: float
    """time.monotonic() when the step's first rollout could be admitted."""
    wait_trainer_s: float
    """Seconds the step waited for the trainer before it could open (backpressure)."""
    discarded: int = 0
    """Rollouts the policy rejected and re-ran (rl: stale)."""
    sample_s: float = 0.0
    """Seconds from the step opening to its last rollout done."""


@dataclass
class _StepRun:
    step: int
    slots: list[Slot]
    opened_at: float
    wait_trainer_s: float
    results: list[Trajectory | None] = field(init=False)
    pending: int = field(init=False)
    account: StepAccount = field(default_factory=StepAccount)
    admitted: int = 0
    discarded: int = 0
    done_at: float = 0.0

    def __post_init__(self) -> None:
        self.results = [None] * len(self.slots)
        self.pending = len(self.slots)


class Producer:
    """Runs the rollouts of steps first..last with at most `max_concurrency` in flight across steps."""

    def __init__(
        self,
        envs: list[Environment],
        scheduler: TaskScheduler,
        client: ChatClient,
        *,
        max_concurrency: int,
        backpressure: Backpressure,
        policy: RolloutPolicy | None = None,
        ledger: SpendLedger | None = None,
        drain_timeout_s: float = 120.0,
    ) -> None:
        self.envs = envs
        self.scheduler = scheduler
        self.client = client
        self.backpressure = backpressure
        self.policy: RolloutPolicy = policy or FixedPolicy()
        self.ledger = ledger
        self.drain_timeout_s = drain_timeout_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self._runs: dict[int, _StepRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._error: BaseException | None = None
        self._error_from_step = 0
        """Steps >= this one will never complete because of `_error` (0: none will be handed over)."""
        self._reported: set[tuple[str, str]] = set()
        """(kind, environment) of the reward failures already logged: each is logged once, then only counted."""

    async def steps(self, first: int, last: int) -> AsyncGenerator[StepRollouts, None]:
        """Each step's rollouts, in step order, as soon as all of them are done. Close it (aclosing) when done."""
        admission = asyncio.create_task(self._admit(first, last))
        try:
            for step in range(first, last + 1):
                run = await self._complete(step)
                del self._runs[step]
                yield StepRollouts(
                    step, run.slots, [t for t in run.results if t is not None], run.account, run.opened_at,
                    run.wait_trainer_s, run.discarded, run.done_at - run.opened_at,
                )  # fmt: skip
        finally:
            admission.cancel()
            if isinstance(self._error, SpendCapReached) and self._tasks:
                await asyncio.wait(set(self._tasks), timeout=self.drain_timeout_s)  # paid answers reach the cache
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(admission, *self._tasks, return_exceptions=True)

    # ---- internals ----

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _fail(self, error: BaseException, from_step: int) -> None:
        if self._error is None or from_step < self._error_from_step:
            self._error, self._error_from_step = error, from_step
        self._notify()

    async def _complete(self, step: int) -> _StepRun:
        while True:
            run = self._runs.get(step)
            if run is not None and run.pending == 0:
                return run
            reason = self.ledger.exhausted() if self.ledger is not None else None
            if reason is not None and (run is None or run.admitted < len(run.slots)):
                # The cap was reached before this step was fully admitted (perhaps while the admission waits for
                # the trainer): it can never complete, so stop now rather than when the trainer moves on.
                self._fail(SpendCapReached(reason), step)
            if self._error is not None and step >= self._error_from_step:
                raise self._error
            await self._changed.wait()

    async def _admit(self, first: int, last: int) -> None:
        try:
            for step in range(first, last + 1):
                waited = await self.backpressure.wait(step)
                slots = self.scheduler.step(step)
                run = _StepRun(step, slots, time.monotonic(), waited)
                self._runs[step] = run
                for index in range(len(slots)):
                    await self._slots.acquire()
                    reason = self.ledger.exhausted() if self.ledger is not None else None
                    if reason is not None:
                        self._slots.release()
                        self._fail(SpendCapReached(reason), step)
                        return
                    task = asyncio.create_task(self._rollout(run, index))
                    run.admitted += 1
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or an unreadable progress file: surface it through steps()
            self._fail(e, 0)

    def _report(self, trajectory: Trajectory) -> None:
        """Log a reward failure's message the first time its kind occurs in its environment."""
        if not is_reward_failure(trajectory):
            return
        kind, env = str(trajectory["error"]), str(trajectory["env"])
        if (kind, env) not in self._reported:
            self._reported.add((kind, env))
            log.warning(
                "rollout set aside (%s): %s. Further ones are counted as rollout/set_aside/%s, not logged",
                kind, trajectory.get("error_message"), kind,
            )  # fmt: skip

    async def _rollout(self, run: _StepRun, index: int) -> None:
        current_account.set(run.account)  # this task's requests are charged to its step
        slot = run.slots[index]
        env = self.envs[slot.env_index]
        try:
            attempt = 0
            while True:
                await self.policy.ready()
                policy_step = self.policy.policy_step()
                trajectory = await rollout_one(env, slot, self.client, run.step, attempt)
                self._report(trajectory)
                trajectory["policy_step"] = policy_step
                if self.policy.keep(policy_step, run.step):
                    break
                run.discarded += 1
                attempt += 1
        except SpendCapReached as e:
            self._fail(e, run.step)
            return
        except Exception as e:  # an environment bug: stop the run with its traceback
            self._fail(e, 0)
            return
        finally:
            self._slots.release()
        run.results[index] = trajectory
        run.pending -= 1
        run.done_at = time.monotonic()
        self._notify()  # a step may be complete, or the usage it added may have reached the spend cap
