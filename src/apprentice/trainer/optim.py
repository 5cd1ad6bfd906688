"""AdamW, learning-rate schedules (warmup then constant/linear/cosine), gradient clipping with a finiteness check."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from apprentice.config.trainer import OptimConfig
from apprentice.errors import ApprenticeError


class NonFiniteError(ApprenticeError, RuntimeError):
    """Loss or gradient norm became NaN/inf; the step was not applied."""


def _constant(progress: float, min_ratio: float) -> float:
    return 1.0


def _linear(progress: float, min_ratio: float) -> float:
    return 1.0 - (1.0 - min_ratio) * progress


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES: dict[str, Callable[[float, float], float]] = {"constant": _constant, "linear": _linear, "cosine": _cosine}


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of `cfg.lr` used by optimizer step `step` (1-based).

    Warmup reaches the full rate at step `warmup_steps`; decay then goes to `min_lr_ratio` at `max_steps`.
    """
    if step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    decay_steps = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return SCHEDULES[cfg.schedule](progress, cfg.min_lr_ratio)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    # foreach=False keeps the update identical for plain and DTensor (FSDP2) parameters.
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        foreach=False,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> LambdaLR:
    """LambdaLR counts from 0 before the first step, so index i is optimizer step i + 1."""
    return LambdaLR(optimizer, lambda i: lr_factor(i + 1, cfg, max_steps))


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (across ranks for FSDP2 DTensors) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(full)
