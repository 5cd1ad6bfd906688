"""Learning-rate schedules, clipping, and the World read from the environment."""

from __future__ import annotations

import math

import pytest
import torch

from apprentice.config import OptimConfig
from apprentice.trainer.optim import build_optimizer, build_scheduler, clip_grad_norm, lr_factor
from apprentice.trainer.world import World


def test_warmup_then_cosine_reaches_min_ratio() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg, 12) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_factor(8, cfg, 12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(12, cfg, 12) == pytest.approx(0.1)


@pytest.mark.parametrize(("schedule", "mid"), [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)])
def test_schedules_mid_point(schedule: str, mid: float) -> None:
    cfg = OptimConfig(lr=1.0, schedule=schedule)  # type: ignore[arg-type]
    assert lr_factor(5, cfg, 10) == pytest.approx(mid)


def test_scheduler_lr_of_step_n_is_factor_n() -> None:
    """The lr used by optimizer step n (read before optimizer.step) is lr * lr_factor(n)."""
    cfg = OptimConfig(lr=0.1, warmup_steps=3, schedule="linear")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, 6)
    used = []
    for _ in range(6):
        used.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert used == pytest.approx([0.1 * lr_factor(n, cfg, 6) for n in range(1, 7)])


def test_clip_returns_pre_clip_norm_and_clips() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert float(clip_grad_norm([p], 1.0)) == pytest.approx(6.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([float("nan"), 0, 0, 0])
    assert math.isnan(float(clip_grad_norm([p], 1.0)))


def test_world_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert World.from_env() == World(0, 1, 0) and not World.from_env().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    world = World.from_env()
    assert (world.rank, world.world_size, world.local_rank, world.is_main, world.distributed) == (3, 4, 1, False, True)
