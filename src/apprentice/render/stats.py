"""Fidelity metrics of rendering, accumulated over one orchestrator step (names under `render/`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from apprentice.render.errors import RenderError
from apprentice.types import TrainingSample


@dataclass
class RenderStats:
    """Add each trajectory's samples (`add`) or its RenderError (`add_error`), then read `metrics()`."""

    trajectories: int = 0
    samples: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    masked_fraction_sum: float = 0.0
    all_false_masks: int = 0
    set_aside: Counter[str] = field(default_factory=Counter)

    def add(self, trajectory_samples: list[TrainingSample]) -> None:
        """Count one rendered trajectory and its samples; an all-False mask is counted, never hidden."""
        self.trajectories += 1
        for sample in trajectory_samples:
            n, k = len(sample), sample.num_loss_tokens
            self.samples += 1
            self.tokens += n
            self.loss_tokens += k
            self.masked_fraction_sum += k / n if n else 0.0
            self.all_false_masks += k == 0

    def add_error(self, err: RenderError) -> None:
        self.set_aside[err.kind] += 1

    def merge(self, other: RenderStats) -> None:
        self.trajectories += other.trajectories
        self.samples += other.samples
        self.tokens += other.tokens
        self.loss_tokens += other.loss_tokens
        self.masked_fraction_sum += other.masked_fraction_sum
        self.all_false_masks += other.all_false_masks
        self.set_aside.update(other.set_aside)

    def metrics(self) -> dict[str, float]:
        """`render/trajectories` rendered, `render/samples` they merged into, `render/set_aside[/<kind>]`,
        `render/masked_fraction` (mean over samples), `render/all_false_masks` (should always be 0)."""
        out = {
            "render/trajectories": float(self.trajectories),
            "render/samples": float(self.samples),
            "render/samples_per_trajectory": self.samples / self.trajectories if self.trajectories else 0.0,
            "render/tokens": float(self.tokens),
            "render/loss_tokens": float(self.loss_tokens),
            "render/masked_fraction": self.masked_fraction_sum / self.samples if self.samples else 0.0,
            "render/all_false_masks": float(self.all_false_masks),
            "render/set_aside": float(sum(self.set_aside.values())),
        }
        for kind, count in sorted(self.set_aside.items()):
            out[f"render/set_aside/{kind}"] = float(count)
        return out
