"""One rollout, and what a step does with its rollouts: set aside the unusable ones, count, explain an empty step."""

from __future__ import annotations

from collections import Counter

from apprentice.clients.base import ChatClient, ClientError
from apprentice.clients.wire import invalid_tool_calls
from apprentice.config import Config
from apprentice.envs.base import Environment
from apprentice.errors import ApprenticeError
from apprentice.orchestrator.scheduler import Slot
from apprentice.trajectory import Trajectory


class NothingToTrainError(ApprenticeError):
    """A whole step produced no trainable sample: training on nothing would only hide the cause."""


def rollout_key(step: int, env: Environment, slot: Slot, attempt: int = 0) -> str:
    """The rollout's cache-key prefix. Unchanged across versions: a resumed run must find its paid answers."""
    key = f"step{step}/{env.name}/{slot.task.id}/sample{slot.sample}"
    return key if attempt == 0 else f"{key}/redo{attempt}"


async def rollout_one(env: Environment, slot: Slot, client: ChatClient, step: int, attempt: int = 0) -> Trajectory:
    """One scored trajectory; a client failure becomes a trajectory with `error` set (counted, not fatal)."""
    try:
        trajectory = await env.rollout(slot.task, client, rollout_key(step, env, slot, attempt))
    except ClientError as e:
        return {
            "steps": [], "tools": env.tools, "reward": 0.0, "metrics": {}, "error": f"client/{e.kind}",
            "error_message": str(e), "task_id": slot.task.id, "env": env.name, "truncated": False,
        }  # fmt: skip
    trajectory.setdefault("env", env.name)
    trajectory.setdefault("task_id", slot.task.id)
    return trajectory


def set_aside_reason(trajectory: Trajectory, truncated_policy: str) -> str | None:
    """Why a rollout is not trained on, or None to keep it."""
    if trajectory.get("error"):
        return str(trajectory["error"])
    if trajectory.get("set_aside"):
        return str(trajectory["set_aside"])
    if not trajectory.get("steps"):
        return "no_steps"
    if invalid_tool_calls(dict(trajectory)):  # the env answered the broken call; the student must not learn it
        return "invalid_tool_call"
    if trajectory.get("truncated") and truncated_policy == "drop":
        return "truncated"
    return None


def rollout_metrics(trajectories: list[Trajectory], dropped: Counter[str]) -> dict[str, float]:
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


def empty_step_message(step: int, trajectories: list[Trajectory], dropped: Counter[str], render: dict[str, float], cfg: Config) -> str:
    reasons = dict(dropped) | {k.removeprefix("render/"): int(v) for k, v in render.items() if k.startswith("render/set_aside/") and v}
    reasons |= {k: int(v) for k, v in render.items() if k.startswith("distill/set_aside/") and v}  # on-policy teacher
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
    if any(r.startswith("distill/set_aside/") for r in reasons):
        hints.append("see distill/set_aside/* in OUTPUT/orchestrator/metrics.jsonl: the teacher could not score these "
                     "samples (docs/distillation.md, on-policy distillation)")
    if any(r.startswith("set_aside/") and r != "set_aside/too_long" for r in reasons):
        hints.append("see render/set_aside/* in OUTPUT/orchestrator/metrics.jsonl: the student's chat template cannot represent these rollouts")
    return (
        f"step {step}: none of the {len(trajectories)} rollouts could be trained on (set aside: {reasons})"
        + (f"; first error: {first_error}" if first_error else "")
        + (f". Fix: {'; '.join(hints)}" if hints else "")
    )
