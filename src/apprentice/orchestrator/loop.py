"""The orchestrator process: for each step, roll out tasks, score, render, split per rank, hand to the trainer.

    step n:  wait until the trainer is at most max_async_level steps behind (backpressure)
             -> tasks of step n (deterministic in (seed, n))
             -> rollouts, concurrently (the client bounds requests in flight)
             -> set aside failed / truncated rollouts (counted by kind)
             -> render with the student tokenizer (unrenderable ones counted by kind)
             -> OUTPUT/rollouts/step_n/ (atomic), metrics line

Resuming is restarting: the next step is the one after the newest complete batch on disk, and the teacher
cache answers any request already paid for.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from apprentice.clients.base import ChatClient, ClientError
from apprentice.config import Config, load_config
from apprentice.envs.base import Environment
from apprentice.envs.registry import load_environment
from apprentice.metrics import MetricsLog, progress_bar
from apprentice.orchestrator.client import build_client
from apprentice.orchestrator.scheduler import Slot, TaskScheduler
from apprentice.render import render_many
from apprentice.tokenizer import load_tokenizer
from apprentice.transport import (
    drop_unpackable,
    latest_step_batch,
    read_trainer_progress,
    split_across_ranks,
    write_step_batch,
)

log = logging.getLogger("apprentice.orchestrator")


class NothingToTrainError(RuntimeError):
    """A whole step produced no trainable sample: training on nothing would only hide the cause."""


async def rollout_one(env: Environment, slot: Slot, client: ChatClient, step: int) -> dict[str, Any]:
    """One scored trajectory; a client failure becomes a trajectory with `error` set (counted, not fatal)."""
    key = f"step{step}/{env.name}/{slot.task.id}/sample{slot.sample}"
    try:
        trajectory = await env.rollout(slot.task, client, key)
    except ClientError as e:
        return {"steps": [], "env": env.name, "task_id": slot.task.id, "reward": 0.0, "error": f"client/{e.kind}", "error_message": str(e)}
    trajectory.setdefault("env", env.name)
    trajectory.setdefault("task_id", slot.task.id)
    return trajectory


def set_aside_reason(trajectory: dict[str, Any], truncated_policy: str) -> str | None:
    """Why a rollout is not trained on, or None to keep it."""
    if trajectory.get("error"):
        return str(trajectory["error"])
    if not trajectory.get("steps"):
        return "no_steps"
    if trajectory.get("truncated") and truncated_policy == "drop":
        return "truncated"
    return None


def rollout_metrics(trajectories: list[dict[str, Any]], dropped: Counter[str]) -> dict[str, float]:
    metrics: dict[str, float] = {"rollout/trajectories": float(len(trajectories))}
    scored = [t for t in trajectories if not t.get("error")]
    if scored:
        metrics["rollout/reward"] = sum(float(t.get("reward", 0.0)) for t in scored) / len(scored)
    by_env: dict[str, list[float]] = {}
    for t in scored:
        by_env.setdefault(str(t["env"]), []).append(float(t.get("reward", 0.0)))
        for name, value in (t.get("metrics") or {}).items():
            by_env.setdefault(f"{t['env']}/{name}", []).append(float(value))
    for name, values in by_env.items():
        suffix = name if "/" in name else f"{name}/reward"
        metrics[f"rollout/{suffix}"] = sum(values) / len(values)
    metrics["rollout/set_aside"] = float(sum(dropped.values()))
    for reason, count in dropped.items():
        metrics[f"rollout/set_aside/{reason}"] = float(count)
    return metrics


def empty_step_message(step: int, trajectories: list[dict[str, Any]], dropped: Counter[str], render: dict[str, float], cfg: Config) -> str:
    reasons = dict(dropped) | {k.removeprefix("render/"): int(v) for k, v in render.items() if k.startswith("render/set_aside/") and v}
    first_error = next((t["error_message"] for t in trajectories if t.get("error_message")), None)
    hints = []
    if any(r.startswith("client/") for r in reasons):
        endpoint = cfg.orchestrator.rollout_model or cfg.orchestrator.student_endpoint
        where = endpoint.base_url if endpoint is not None else "the inference server"
        hints.append(f"check that {where} is up and the API key variable is set")
    if "truncated" in reasons:
        hints.append("raise orchestrator.sampling.max_tokens or set orchestrator.truncated = \"keep\"")
    if reasons.get("set_aside/too_long"):
        hints.append("raise trainer.micro_batch_tokens or lower orchestrator.sampling.max_tokens: rendered samples are longer than a micro-batch")
    if any(r.startswith("set_aside/") and r != "set_aside/too_long" for r in reasons):
        hints.append("see render/set_aside/* in OUTPUT/orchestrator/metrics.jsonl: the student's chat template cannot represent these rollouts")
    return (
        f"step {step}: none of the {len(trajectories)} rollouts could be trained on (set aside: {reasons})"
        + (f"; first error: {first_error}" if first_error else "")
        + (f". Fix: {'; '.join(hints)}" if hints else "")
    )


async def wait_for_trainer(output_dir: Path, step: int, max_async_level: int) -> float:
    """Block until step `step` is within max_async_level of the trainer's last finished step; seconds waited."""
    start = time.monotonic()
    announced = False
    while step - 1 - read_trainer_progress(output_dir) > max_async_level:
        if not announced:
            log.info("step %d: waiting for the trainer (max_async_level=%d)", step, max_async_level)
            announced = True
        await asyncio.sleep(0.2)
    return time.monotonic() - start


async def run(cfg: Config) -> None:
    orch = cfg.orchestrator
    output_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    envs = [load_environment(env_cfg, seed=cfg.seed) for env_cfg in orch.env]
    scheduler = TaskScheduler(envs, [e.weight for e in orch.env], orch.tasks_per_step, orch.rollouts_per_prompt, orch.seed)
    client = build_client(cfg)
    first = latest_step_batch(output_dir) + 1
    metrics_log = MetricsLog(output_dir / "orchestrator" / "metrics.jsonl", cfg.log, resume_after=first - 1)
    if first > 1:
        log.info("resuming: steps 1..%d are already written, continuing at step %d", first - 1, first)
    bar = progress_bar(range(first, cfg.trainer.max_steps + 1), cfg.log, desc="orchestrator", unit="step")
    for step in bar:
        waited = await wait_for_trainer(output_dir, step, orch.max_async_level)
        started = time.monotonic()
        slots = scheduler.step(step)
        trajectories = await asyncio.gather(*(rollout_one(envs[s.env_index], s, client, step) for s in slots))

        dropped: Counter[str] = Counter()
        kept = []
        for trajectory in trajectories:
            reason = set_aside_reason(trajectory, orch.truncated)
            if reason is None:
                kept.append(trajectory)
            else:
                dropped[reason] += 1
        samples, render_stats = render_many(
            kept, tokenizer, reasoning=orch.reasoning, allow_control_tokens=orch.allow_control_tokens
        )
        # A sample the trainer cannot pack is never written: a stored batch must not stop every rerun.
        samples, too_long = drop_unpackable(samples, cfg.trainer.micro_batch_tokens)
        render_metrics = render_stats.metrics() | {"render/set_aside/too_long": float(too_long)}
        if not samples:
            raise NothingToTrainError(empty_step_message(step, trajectories, dropped, render_metrics, cfg))
        write_step_batch(output_dir, step, split_across_ranks(samples, cfg.trainer.num_processes), {"tasks": [f"{t['env']}/{t['task_id']}" for t in trajectories]})

        metrics: dict[str, float] = {"step": step}
        metrics.update(rollout_metrics(trajectories, dropped))
        metrics.update(render_metrics)
        metrics.update(client.metrics(reset=True))
        metrics["perf/step_time_s"] = time.monotonic() - started
        metrics["perf/backpressure_wait_s"] = waited
        metrics_log.write(metrics)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(reward=f"{metrics.get('rollout/reward', 0.0):.3f}", samples=len(samples), dropped=sum(dropped.values()))
    metrics_log.close()
    await client.aclose()


def main(cfg: Config) -> None:
    logging.basicConfig(level=cfg.log.level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpx2", "openai"):  # one INFO line per request drowns the step log
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        asyncio.run(run(cfg))
    except NothingToTrainError as e:  # an expected failure (teacher down, every turn truncated): say why, no traceback
        log.error("%s", e)
        sys.exit(1)


if __name__ == "__main__":
    main(load_config(sys.argv[1:2], sys.argv[2:]))
