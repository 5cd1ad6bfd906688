"""rl mode: which weights sample each batch, keeping the server on them, and which rollouts are too stale.

`PolicySync` is both seams of the continuous producer (orchestrator/producer.py):

    Backpressure.wait(n)    before step n opens: wait until weights recent enough for batch n are published,
                            `reload` the newest into the server (collective weight updates: or apply the
                            newest the trainer sent, staged in the server), then start `on_step(n, policy_step)`
                            (the held-out evaluation when due) beside the step's rollouts; the next reload
                            waits for it
    RolloutPolicy.ready()   not while the server reloads weights
    .policy_step()          the weights sampling now; the producer tags each rollout with it
    .keep(w, n)             a rollout sampled by weights w may go into batch n (else it is re-rolled)

Batch n is consumed by trainer step n, which applies its update to the weights of step n - 1. A rollout
sampled with the weights of step w is therefore (n - 1) - w updates behind: its lag. Step n opens only once the
newest published weights are at least n - 1 - bound (bound = min(max_async_level, max_off_policy_steps)), so
`policy/lag` stays within max_async_level; rollouts still in flight when newer weights arrive are kept while
their lag is at most max_off_policy_steps.

`prepare_batch` then computes the group advantages of a complete step (orchestrator/advantages.py) and the
`policy/*` metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx

from apprentice.clients.session import endpoint_headers
from apprentice.config import Config
from apprentice.config.rl import weight_broadcast
from apprentice.errors import ApprenticeError
from apprentice.handoff.weights import latest_published, weights_dir
from apprentice.inference.backends import Backend, backend_for
from apprentice.orchestrator.advantages import assign_advantages
from apprentice.orchestrator.client import rollout_endpoint
from apprentice.trajectory import Trajectory

log = logging.getLogger("apprentice.orchestrator")

POLL_S = 0.1


def lag(policy_step: int, batch_step: int) -> int:
    """Updates between the sampling weights and the weights trainer step `batch_step` applies its update to."""
    return (batch_step - 1) - policy_step


def fresh(policy_step: int, batch_step: int, max_off_policy_steps: int) -> bool:
    """Whether a rollout sampled by `policy_step` may still be trained on in batch `batch_step`."""
    return lag(policy_step, batch_step) <= max_off_policy_steps


def policy_metrics(trajectories: list[Trajectory], step: int) -> dict[str, float]:
    """`policy/step`: newest weights used in the batch; `policy/lag`: the largest lag over its samples."""
    steps = [int(t.get("policy_step", 0)) for t in trajectories]
    if not steps:
        return {}
    return {"policy/step": float(max(steps)), "policy/lag": float(max(lag(w, step) for w in steps))}


def prepare_batch(trajectories: list[Trajectory], step: int, cfg: Config) -> dict[str, float]:
    """Group advantages (in place) and the rl metrics of a complete step's trajectories (in slot order)."""
    metrics = assign_advantages(trajectories, cfg.orchestrator)
    skipped = [t for t in trajectories if t.get("set_aside") == "zero_advantage"]
    if skipped and len(skipped) == sum(1 for t in trajectories if not t.get("error")):
        for t in skipped:  # nothing else to train on: keep them (zero advantages, no gradient) rather than stall
            del t["set_aside"]
    return metrics | policy_metrics(trajectories, step)


class PolicySync:
    """Keeps the inference server on the newest published weights the async bound allows."""

    def __init__(
        self, cfg: Config, backend: Backend | None = None, on_step: Callable[[int, int], Coroutine[Any, Any, None]] | None = None
    ) -> None:
        self.output_dir = Path(cfg.output_dir)
        endpoint = rollout_endpoint(cfg)
        self.base_url = endpoint.base_url
        self.backend = backend or backend_for(cfg)
        self.initial_model = cfg.model.name
        self.bound = min(cfg.orchestrator.max_async_level, cfg.orchestrator.max_off_policy_steps)
        self.max_off_policy_steps = cfg.orchestrator.max_off_policy_steps
        self.startup_timeout_s = cfg.inference.startup_timeout_s if cfg.inference is not None else 120.0
        self.wait_timeout_s = cfg.trainer.batch_timeout_s
        self.on_step = on_step
        self.phases: dict[int, dict[str, float]] = {}
        """Per step, the seconds its opening spent reloading weights and evaluating (`take_phases`)."""
        self._reload_s = self._eval_wait_s = 0.0
        self._evaluating: asyncio.Task[None] | None = None
        self.collective = weight_broadcast(cfg) == "collective"
        self.staged: int | None = None
        """collective: the step of the complete update the server holds staged, at the last look (`newest`)."""
        self.loaded: int | None = None
        """Published step the server holds, as far as this process knows (None: not asked yet)."""
        # The server's key and headers (a student_endpoint behind `apprentice serve --api-key-var`): reloads too.
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0),
                                       headers=endpoint_headers(endpoint, "orchestrator.student_endpoint"))  # fmt: skip
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- the producer's seams ----

    async def wait(self, step: int) -> float:
        """Backpressure: return once step `step` may open (weights loaded, evaluation done); seconds waited."""
        start = time.monotonic()
        self._reload_s = self._eval_wait_s = 0.0
        policy_step = await self.reload_newest(max(0, step - 1 - self.bound), step)
        self.phases[step] = {"perf/reload_s": self._reload_s, "perf/eval_wait_s": self._eval_wait_s}
        if self.on_step is not None:
            # The evaluation runs beside the step's rollouts (the server batches both), not before them: the next
            # reload waits for it instead (`reload`), so it still scores exactly the weights it started on.
            self._evaluating = asyncio.create_task(self.on_step(step, policy_step))
        return time.monotonic() - start

    def take_phases(self, step: int) -> dict[str, float]:
        """`perf/reload_s` (the server's reload time, as it reports it) and `perf/eval_wait_s` (how long the reload
        waited for the held-out evaluation still running on the previous weights) before step `step` opened."""
        return self.phases.pop(step, {})

    async def finish_evaluation(self) -> None:
        """Wait for the evaluation running on the current weights, if any (its errors are raised here)."""
        if self._evaluating is not None:
            task, self._evaluating = self._evaluating, None
            waited = time.monotonic()
            await task
            self._eval_wait_s += time.monotonic() - waited

    async def ready(self) -> None:
        await self._idle.wait()

    def policy_step(self) -> int:
        return self.loaded or 0

    def keep(self, policy_step: int, batch_step: int) -> bool:
        return fresh(policy_step, batch_step, self.max_off_policy_steps)

    # ---- weights ----

    async def wait_ready(self) -> None:
        """Block until the server answers /models (it may still be loading the model)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                status = (await self._http.get(f"{self.base_url}/models", timeout=5.0)).status_code
            except httpx.HTTPError:
                status = None
            if status in (401, 403):
                raise ApprenticeError(
                    f"the inference server at {self.base_url} refused the credentials (HTTP {status}): check the key "
                    "in the variable orchestrator.student_endpoint.api_key_var names"
                )
            if status is not None and status < 500:
                return
            if time.monotonic() > deadline:
                raise ApprenticeError(
                    f"the inference server at {self.base_url} did not answer within {self.startup_timeout_s:.0f} s; "
                    f"see its log (prefixed [inference]) or raise inference.startup_timeout_s"
                )
            await asyncio.sleep(0.5)

    async def reload_newest(self, need: int, step: int) -> int:
        """Wait for published weights of step >= `need`, `reload` the newest; the step served (`step` is for
        messages)."""
        start = time.monotonic()
        announced = False
        while (newest := await self.newest()) < need:
            if not announced:
                log.info("step %d: waiting for the trainer's weights of step %d (async bound %d)", step, need, self.bound)
                announced = True
            if time.monotonic() - start > self.wait_timeout_s:
                raise ApprenticeError(
                    f"step {step}: no weights of step >= {need} in {self.output_dir}/weights after "
                    f"{self.wait_timeout_s:.0f} s; is the trainer running? (trainer.batch_timeout_s)"
                )
            await asyncio.sleep(POLL_S)
        await self.reload(newest)
        return self.policy_step()  # newest, or a newer collective update that replaced it while reload waited

    async def newest(self) -> int:
        """The newest weights the server could sample from: published on disk, or (collective) staged in it."""
        published = latest_published(self.output_dir)
        if not self.collective:
            return published
        staged = await self.backend.staged(self._http, self.base_url)
        self.staged = staged if staged is not None and staged >= published else None
        return self.staged or published

    async def reload(self, step: int) -> None:
        """Tell the server to sample from the weights of `step` (0: the initial model); no-op when it already does."""
        if self.loaded is None:
            self.loaded = await self._server_step()
        if step == self.loaded:
            return
        path = weights_dir(self.output_dir, step) if step else Path(self.initial_model)
        await self.finish_evaluation()
        started = time.monotonic()
        self._idle.clear()  # new rollouts wait: each must be tagged with the weights that really sample it
        try:
            if step == self.staged:  # sent by the trainer over the collective (inference/collective.py)
                server_s, step = await self.backend.apply(self._http, self.base_url, step)  # or a newer one
            else:
                server_s = await self.backend.reload(self._http, self.base_url, path, step)
        finally:
            self._idle.set()
        elapsed = time.monotonic() - started
        self._reload_s += elapsed if server_s is None else server_s
        log.info("inference server now on the weights of step %d (%.1f s)", step, elapsed)
        self.loaded = step

    async def _server_step(self) -> int | None:
        """The published step the server holds, from GET /v1/weights (apprentice serve) when it can tell."""
        try:
            response = await self._http.get(f"{self.base_url}/weights", timeout=10.0)
            held = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            held = None
        if not isinstance(held, dict) or not isinstance(held.get("path"), str):
            return 0  # a server that cannot tell (vLLM): it was started on the initial model or the newest weights
        path = Path(held["path"])
        if path.name.startswith("step_") and path.parent.resolve() == (self.output_dir / "weights").resolve():
            return int(path.name.removeprefix("step_"))  # started from, or loaded, one of this run's weights
        return 0 if int(held.get("step", 0)) == 0 else None  # None: unknown weights, reload whatever is asked

    async def aclose(self) -> None:
        if self._evaluating is not None:
            self._evaluating.cancel()
        await self._http.aclose()
