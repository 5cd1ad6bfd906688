"""rl mode: which weights sample each batch, keeping the server on them, and discarding stale rollouts.

Hook points of the orchestrator loop (one call each per step):

    policy_step = await sync.before_step(n)     # wait for / load weights before sampling batch n
    tag(trajectories, policy_step)              # each rollout remembers the weights that produced it
    kept, stale = discard_stale(trajectories, n, max_off_policy_steps)
    metrics |= policy_metrics(kept, n)          # policy/step, policy/lag

Batch n is consumed by trainer step n, which applies its update to the weights of step n - 1. A rollout
sampled with the weights of step w is therefore (n - 1) - w updates behind: its lag. `before_step` waits until
the newest published weights are at least n - 1 - bound (bound = min(max_async_level, max_off_policy_steps)),
then loads the newest ones, so the lag of a freshly sampled batch never exceeds max_async_level. A producer
that keeps rollouts in flight across steps (continuous batching) still tags and filters with the other two.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from apprentice.config import Config
from apprentice.errors import ApprenticeError
from apprentice.inference.backends import Backend, backend_for
from apprentice.orchestrator.client import rollout_endpoint
from apprentice.trainer.publish import latest_published, weights_dir

log = logging.getLogger("apprentice.orchestrator")

POLL_S = 0.1


def tag(trajectories: list[dict[str, Any]], policy_step: int) -> None:
    """Record on each trajectory the published step of the weights that sampled it (0 = initial model)."""
    for t in trajectories:
        t.setdefault("policy_step", policy_step)


def lag(trajectory: dict[str, Any], step: int) -> int:
    """Updates between the sampling weights and the weights trainer step `step` applies its update to."""
    return (step - 1) - int(trajectory["policy_step"])


def discard_stale(trajectories: list[dict[str, Any]], step: int, max_off_policy_steps: int) -> tuple[list[dict[str, Any]], int]:
    """(trajectories at most `max_off_policy_steps` behind for batch `step`, how many were discarded)."""
    kept = [t for t in trajectories if lag(t, step) <= max_off_policy_steps]
    return kept, len(trajectories) - len(kept)


def policy_metrics(trajectories: list[dict[str, Any]], step: int) -> dict[str, float]:
    """`policy/step`: newest weights used in the batch; `policy/lag`: the largest lag over its samples."""
    if not trajectories:
        return {}
    return {
        "policy/step": float(max(int(t["policy_step"]) for t in trajectories)),
        "policy/lag": float(max(lag(t, step) for t in trajectories)),
    }


class PolicySync:
    """Keeps the inference server on the newest published weights the async bound allows."""

    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.output_dir = Path(cfg.output_dir)
        self.base_url = rollout_endpoint(cfg).base_url
        self.backend = backend or backend_for(cfg)
        self.bound = min(cfg.orchestrator.max_async_level, cfg.orchestrator.max_off_policy_steps)
        self.startup_timeout_s = cfg.inference.startup_timeout_s if cfg.inference is not None else 120.0
        self.wait_timeout_s = cfg.trainer.batch_timeout_s
        self.initial_model = cfg.model.name
        self.loaded: int | None = None
        """Published step the server holds, as far as this process knows (None: not asked yet)."""
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))

    async def wait_ready(self) -> None:
        """Block until the server answers /models (it may still be loading the model)."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                if (await self._http.get(f"{self.base_url}/models", timeout=5.0)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ApprenticeError(
                    f"the inference server at {self.base_url} did not answer within {self.startup_timeout_s:.0f} s; "
                    f"see its log (prefixed [inference]) or raise inference.startup_timeout_s"
                )
            await asyncio.sleep(0.5)

    async def before_step(self, step: int) -> int:
        """Wait until weights recent enough for batch `step` are published, load the newest; their step."""
        return await self.sync_to(max(0, step - 1 - self.bound), step)

    async def sync_to(self, need: int, step: int) -> int:
        """Wait for published weights of step >= `need`, load the newest; their step (`step` is for messages)."""
        start = time.monotonic()
        announced = False
        while (newest := latest_published(self.output_dir)) < need:
            if not announced:
                log.info("step %d: waiting for the trainer's weights of step %d (async bound %d)", step, need, self.bound)
                announced = True
            if time.monotonic() - start > self.wait_timeout_s:
                raise ApprenticeError(
                    f"step {step}: no weights of step >= {need} in {self.output_dir}/weights after "
                    f"{self.wait_timeout_s:.0f} s; is the trainer running? (trainer.batch_timeout_s)"
                )
            await asyncio.sleep(POLL_S)
        await self.load(newest)
        return newest

    async def load(self, step: int) -> None:
        """Tell the server to sample from the weights of `step` (0: the initial model); no-op when it already does."""
        if self.loaded is None:
            self.loaded = await self._server_step()
        if step == self.loaded:
            return
        path = weights_dir(self.output_dir, step) if step else Path(self.initial_model)
        started = time.monotonic()
        await self.backend.load_weights(self._http, self.base_url, path, step)
        log.info("inference server now on the weights of step %d (%.1f s)", step, time.monotonic() - started)
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
        await self._http.aclose()


def prepare_batch(
    trajectories: list[dict[str, Any]], step: int, policy_step: int, cfg: Config
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Tag, compute group advantages, drop stale rollouts: (trajectories to render, rl metrics)."""
    from apprentice.orchestrator.advantages import assign_advantages

    tag(trajectories, policy_step)
    metrics = assign_advantages(trajectories, cfg.orchestrator)
    skipped = [t for t in trajectories if t.get("set_aside") == "zero_advantage"]
    if skipped and len(skipped) == sum(1 for t in trajectories if not t.get("error")):
        for t in skipped:  # nothing else to train on: keep them (zero advantages, no gradient) rather than stall
            del t["set_aside"]
    kept, stale = discard_stale(trajectories, step, cfg.orchestrator.max_off_policy_steps)
    metrics["rollout/stale_discarded"] = float(stale)
    metrics.update(policy_metrics(kept, step))
    return kept, metrics
