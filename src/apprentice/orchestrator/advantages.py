"""Group-relative advantages (rl mode): each sample's reward against the other samples of the same task.

The scheduler lays out a step as consecutive groups of `rollouts_per_prompt` slots of one task, and the
orchestrator keeps that order, so group g is trajectories[g*k : (g+1)*k]. Within a group, over the members
that were scored (a failed request has no reward):

    advantage_i = reward_i - mean(rewards)                 (Dr. GRPO; advantage_std_norm = false)
    advantage_i = (reward_i - mean(rewards)) / (std + eps)  (GRPO;    advantage_std_norm = true)

A group whose rewards are all equal has all-zero advantages: it teaches nothing, so it is counted
(`rollout/zero_advantage_groups`) and, with `skip_zero_advantage`, set aside before rendering.
"""

from __future__ import annotations

import math

from apprentice.config import OrchestratorConfig
from apprentice.trajectory import Trajectory

_EPS = 1e-6


def group_advantages(rewards: list[float], std_norm: bool) -> list[float]:
    """Advantages of one group's rewards (same order)."""
    if not rewards:
        return []
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if not std_norm:
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    return [c / (std + _EPS) for c in centred]


def assign_advantages(trajectories: list[Trajectory], cfg: OrchestratorConfig) -> dict[str, float]:
    """Set `trajectory["advantage"]` on every scored trajectory, in place; returns `rollout/*` counters.

    Zero-signal groups get `set_aside = "zero_advantage"` when `cfg.skip_zero_advantage` is on.
    """
    if cfg.advantage == "reward":
        for t in trajectories:
            t["advantage"] = float(t.get("reward", 0.0))
        return {}
    k = cfg.rollouts_per_prompt
    if len(trajectories) % k:
        raise ValueError(f"{len(trajectories)} trajectories are not whole groups of rollouts_per_prompt={k}")
    zero_groups = 0
    for start in range(0, len(trajectories), k):
        group = [t for t in trajectories[start : start + k] if not t.get("error")]
        rewards = [float(t.get("reward", 0.0)) for t in group]
        for t, advantage in zip(group, group_advantages(rewards, cfg.advantage_std_norm), strict=True):
            t["advantage"] = advantage
        if len(group) < 2 or max(rewards) - min(rewards) <= _EPS:
            zero_groups += 1
            if cfg.skip_zero_advantage:
                for t in group:
                    t["set_aside"] = "zero_advantage"
    return {"rollout/zero_advantage_groups": float(zero_groups), "rollout/groups": float(len(trajectories) // k)}
