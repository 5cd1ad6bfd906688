"""One rollout, and what a step does with its rollouts: set aside the unusable ones, count, explain an empty step."""

from __future__ import annotations

import math
from collections import Counter

from apprentice.clients.base import ChatClient, ClientError
from apprentice.clients.wire import invalid_tool_calls
from apprentice.config import Config
from apprentice.envs.base import Environment
from apprentice.envs.reward_check import REWARD_KINDS, RewardError, checked_reward
from apprentice.errors import ApprenticeError
from apprentice.orchestrator.scheduler import Slot
from apprentice.trajectory import Trajectory


class NothingToTrainError(ApprenticeError):
    """A whole step produced no trainable sample: training on nothing would only hide the cause."""


def rollout_key(step: int, env: Environment, slot: Slot, attempt: int = 0) -> str:
    """The rollout's cache-key prefix. Unchanged across versions: a resumed run must find its paid answers."""
    key = f"step{step}/{env.name}/{slot.task.id}/sample{slot.sample}"
    return key if attempt == 0 else f"{key}/redo{attempt}"


def failed_rollout(env: Environment, slot: Slot, kind: str, message: str) -> Trajectory:
    """A rollout that produced nothing trainable: counted as `rollout/set_aside/<kind>`, its message kept."""
    return {
        "steps": [], "tools": env.tools, "reward": 0.0, "metrics": {}, "error": kind, "error_message": message,
        "task_id": slot.task.id, "env": env.name, "truncated": False,
    }  # fmt: skip


async def rollout_one(env: Environment, slot: Slot, client: ChatClient, step: int, attempt: int = 0) -> Trajectory:
    """One scored trajectory. A client failure, a reward function that raised and a reward that is not a finite
    real number each become a trajectory with `error` set (counted, set aside, never trained on; reward 0.0)."""
    try:
        trajectory = await env.rollout(slot.task, client, rollout_key(step, env, slot, attempt))
    except ClientError as e:
        return failed_rollout(env, slot, f"client/{e.kind}", str(e))
    except RewardError as e:
        return failed_rollout(env, slot, e.kind, str(e))
    trajectory.setdefault("env", env.name)
    trajectory.setdefault("task_id", slot.task.id)
    try:
        trajectory["reward"] = checked_reward(trajectory.get("reward", 0.0), f"the reward of environment {env.name!r}")
    except RewardError as e:
        trajectory["reward"], trajectory["error"], trajectory["error_message"] = 0.0, e.kind, str(e)
    return trajectory


def is_reward_failure(trajectory: Trajectory) -> bool:
    return trajectory.get("error") in REWARD_KINDS


def set_aside_reason(trajectory: Trajectory, truncated_policy: str, token_path: bool = False) -> str | None:
    """Why a rollout is not trained on, or None to keep it. `token_path` (rl mode, the token client): every step
    must carry the server's token ids and logprobs; a step without (an environment that built its steps itself
    rather than with `make_step`) would be re-rendered from text and trained with zero inference logprobs and an
    advantage of 1, whatever its reward: set aside as "no_tokens"."""
    if trajectory.get("error"):
        return str(trajectory["error"])
    if trajectory.get("set_aside"):
        return str(trajectory["set_aside"])
    if not trajectory.get("steps"):
        return "no_steps"
    if token_path and not all(step.get("tokens") for step in trajectory["steps"]):
        return "no_tokens"
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
    skipped: Counter[str] = Counter()
    for t in scored:
        by_env.setdefault(str(t["env"]), []).append(float(t.get("reward", 0.0)))
        for name, value in (t.get("metrics") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                by_env.setdefault(f"{t['env']}/{name}", []).append(float(value))
            else:  # an environment's own metric (None where undefined, a string): not averaged, never a crash
                skipped[f"{t['env']}/{name}"] += 1
    for name, values in by_env.items():
        suffix = name if "/" in name else f"{name}/reward"
        metrics[f"rollout/{suffix}"] = sum(values) / len(values)
    for name, count in skipped.items():
        metrics[f"rollout/{name}/not_a_number"] = float(count)
    metrics["rollout/set_aside"] = float(sum(dropped.values()))
    for reason, count in dropped.items():
        metrics[f"rollout/set_aside/{reason}"] = float(count)
    return metrics


def set_aside_counts(dropped: Counter[str], stats: dict[str, float]) -> dict[str, int]:
    """Every kind of set-aside rollout or sample of a step: the orchestrator's own (`dropped`), render's
    (`render/set_aside/*`, as "set_aside/<kind>") and the scoring teacher's (`distill/set_aside/*`, as
    "distill/<kind>")."""
    counts = dict(dropped)
    for name, value in stats.items():
        if value and name.startswith("render/set_aside/"):
            counts[name.removeprefix("render/")] = int(value)
        elif value and name.startswith("distill/set_aside/"):
            counts["distill/" + name.removeprefix("distill/set_aside/")] = int(value)
    return counts


def empty_step_message(
    step: int, trajectories: list[Trajectory], dropped: Counter[str], stats: dict[str, float], cfg: Config,
    scoring_errors: dict[str, str] | None = None,
) -> str:  # fmt: skip
    """One line: how many rollouts, set aside for what (counts by kind), the first error text of the teacher or
    environment, and the fix. `stats`: the step's render/distill metrics; `scoring_errors`: the scoring teacher's
    first message per kind (on-policy distillation)."""
    reasons = set_aside_counts(dropped, stats)
    failed = next((t for t in trajectories if t.get("error_message")), None)
    first_error = f"{failed['error']} in environment {failed['env']!r}: {failed['error_message']}" if failed else None
    teacher = cfg.orchestrator.teacher_model
    if scoring_errors and teacher is not None:
        kind, text = next(iter(scoring_errors.items()))
        scoring = f"the scoring teacher orchestrator.teacher_model ({teacher.base_url}, model {teacher.model!r}) failed ({kind}): {text}"
        first_error = f"{first_error}; {scoring}" if first_error else scoring
    hints = []
    if any(r.startswith("client/") for r in reasons):
        endpoint = cfg.orchestrator.rollout_model or cfg.orchestrator.student_endpoint
        where = endpoint.base_url if endpoint is not None else "the inference server"
        hints.append(f"check that {where} is up and the API key variable is set")
    if any(r.startswith("distill/") for r in reasons) and teacher is not None:
        hints.append(f"check the scoring teacher at {teacher.base_url} (see distill/set_aside/* and teacher/errors/*)")
    if any(r in REWARD_KINDS for r in reasons):
        hints.append("fix the environment's reward function: it must return a finite float, int or bool for every sample")
    if "no_tokens" in reasons:
        hints.append("the environment built its trajectory steps without the server's token ids: build each step "
                     "with apprentice.envs.trajectory.make_step(prompt, completion, response) from the client's "
                     "response (rl mode trains on the exact sampled tokens and their logprobs)")
    if "truncated" in reasons:
        hints.append("raise orchestrator.sampling.max_tokens or set orchestrator.truncated = \"keep\"")
    if reasons.get("set_aside/too_long"):
        hints.append("raise trainer.micro_batch_tokens or lower orchestrator.sampling.max_tokens: rendered samples are longer than a micro-batch")
    if any(r.startswith("set_aside/") and r != "set_aside/too_long" for r in reasons):
        hints.append("see render/set_aside/* in OUTPUT/orchestrator/metrics.jsonl: the student's chat template cannot represent these rollouts")
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(reasons.items())) or "none"
    return (
        f"step {step}: none of the {len(trajectories)} rollouts could be trained on (set aside: {counts})"
        + (f"; first error: {first_error}" if first_error else "")
        + (f". Fix: {'; '.join(hints)}" if hints else "")
    )
