"""rl-mode orchestrator pieces: group advantages, policy tagging, lag and stale-rollout discard."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from apprentice.config import Config, ModelConfig, OrchestratorConfig
from apprentice.orchestrator.advantages import assign_advantages, group_advantages
from apprentice.orchestrator.policy import PolicySync, fresh, policy_metrics, prepare_batch


def traj(reward: float, error: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"reward": reward, "error": error, "env": "e", "task_id": "t", "steps": [{}], **extra}


def orch(**kwargs: Any) -> OrchestratorConfig:
    return OrchestratorConfig(batch_size=kwargs.pop("batch_size", 4), **kwargs)


def test_group_advantages_centre_and_optionally_scale() -> None:
    assert group_advantages([1.0, 0.0, 0.5, 0.5], std_norm=False) == pytest.approx([0.5, -0.5, 0.0, 0.0])
    scaled = group_advantages([1.0, 0.0, 0.5, 0.5], std_norm=True)
    assert sum(scaled) == pytest.approx(0.0, abs=1e-9)
    assert math.sqrt(sum(a * a for a in scaled) / 4) == pytest.approx(1.0, rel=1e-4)
    assert group_advantages([0.3, 0.3], std_norm=True) == [0.0, 0.0]  # equal rewards: no division blow-up


def test_assign_advantages_per_group_and_counts_zero_signal_groups() -> None:
    batch = [traj(1.0), traj(0.0), traj(0.2), traj(0.2), traj(0.7), traj(0.0, error="client/timeout")]
    metrics = assign_advantages(batch, orch(batch_size=6, rollouts_per_prompt=2))
    assert [t.get("advantage") for t in batch[:4]] == pytest.approx([0.5, -0.5, 0.0, 0.0])
    # A group with one scored member has no baseline: advantage 0, counted as zero-signal; the failed one gets none.
    assert batch[4]["advantage"] == 0.0 and "advantage" not in batch[5]
    assert metrics["rollout/zero_advantage_groups"] == 2.0 and metrics["rollout/groups"] == 3.0
    assert not any("set_aside" in t for t in batch)


def test_skip_zero_advantage_sets_those_groups_aside() -> None:
    batch = [traj(1.0), traj(0.0), traj(0.2), traj(0.2)]
    assign_advantages(batch, orch(rollouts_per_prompt=2, skip_zero_advantage=True))
    assert [t.get("set_aside") for t in batch] == [None, None, "zero_advantage", "zero_advantage"]


def test_reward_advantage_is_the_raw_reward() -> None:
    batch = [traj(0.25), traj(0.75)]
    assert assign_advantages(batch, orch(batch_size=2, advantage="reward")) == {}
    assert [t["advantage"] for t in batch] == [0.25, 0.75]


def test_staleness_and_lag_are_measured_against_the_consuming_step() -> None:
    # Batch 7 is applied to the weights of step 6: weights 2, 5 and 6 are 4, 1 and 0 updates behind.
    assert [fresh(w, 7, max_off_policy_steps=2) for w in (2, 5, 6)] == [False, True, True]
    assert fresh(2, 7, max_off_policy_steps=4)
    batch = [traj(0.1, policy_step=5), traj(0.2, policy_step=6)]
    assert policy_metrics(batch, 7) == {"policy/step": 6.0, "policy/lag": 1.0}


def test_policy_sync_keeps_fresh_rollouts_only() -> None:
    cfg = Config(model=ModelConfig(name="m"), orchestrator=orch(rollouts_per_prompt=2, max_off_policy_steps=1),
                 inference={"port": 8123})  # fmt: skip
    sync = PolicySync(cfg)
    assert sync.keep(5, 7) and not sync.keep(4, 7)  # lag 1 kept, lag 2 re-rolled by the producer
    assert sync.policy_step() == 0  # before anything is loaded: the model the server started with
    asyncio.run(sync.aclose())


def test_prepare_batch_computes_advantages_and_policy_metrics() -> None:
    cfg = Config(model=ModelConfig(name="m"), orchestrator=orch(rollouts_per_prompt=2), inference={"port": 8123})
    batch = [traj(1.0, policy_step=2), traj(0.0, policy_step=2), traj(0.5, policy_step=1), traj(0.5, policy_step=2)]
    metrics = prepare_batch(batch, 3, cfg)  # type: ignore[arg-type]
    assert [t["advantage"] for t in batch] == [0.5, -0.5, 0.0, 0.0]
    assert metrics["policy/lag"] == 1.0 and metrics["policy/step"] == 2.0
    assert metrics["rollout/zero_advantage_groups"] == 1.0


def test_when_every_group_is_zero_signal_they_are_kept_rather_than_stalling() -> None:
    cfg = Config(model=ModelConfig(name="m"), orchestrator=orch(rollouts_per_prompt=2, skip_zero_advantage=True),
                 inference={"port": 8123})  # fmt: skip
    batch = [traj(0.0), traj(0.0), traj(1.0), traj(1.0)]
    metrics = prepare_batch(batch, 1, cfg)  # type: ignore[arg-type]
    assert not any("set_aside" in t for t in batch)
    assert metrics["rollout/zero_advantage_groups"] == 2.0
