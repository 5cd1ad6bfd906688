"""`[trainer]`, `[trainer.loss]`, `[trainer.optim]`, `[trainer.ckpt]`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from apprentice.config.base import Section


class SFTLossConfig(Section):
    """Masked negative log-likelihood on the loss-mask tokens (distill mode)."""

    type: Literal["sft"] = "sft"
    """Loss kind; "sft" trains the student to reproduce the masked tokens."""


class RLLossConfig(Section):
    """Importance-weighted policy gradient against the inference server's logprobs (rl mode)."""

    type: Literal["rl"] = "rl"
    """Loss kind; "rl" needs inference logprobs, so it is only valid with a local inference server."""
    ratio_low: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Trust region: tokens whose importance ratio exp(trainer_lp - inference_lp) is below this are masked."""
    ratio_high: float = Field(default=2.0, gt=1.0)
    """Trust region: tokens whose importance ratio is above this are masked."""
    kl_coef: float = Field(default=0.0, ge=0.0)
    """Weight of the penalty on the squared log ratio (0 disables it)."""


def _loss_type(value: Any) -> Any:
    """The union tag. A `[trainer.loss]` table without `type` is the default "rl" loss (DESIGN.md section 3)."""
    return value.get("type", "rl") if isinstance(value, dict) else getattr(value, "type", None)


LossConfig = Annotated[
    Annotated[RLLossConfig, Tag("rl")] | Annotated[SFTLossConfig, Tag("sft")],
    Discriminator(
        _loss_type,
        custom_error_type="loss_type",
        custom_error_message='trainer.loss.type must be "rl" (rl mode) or "sft" (distill mode): set it under [trainer.loss]',
    ),
]


class OptimConfig(Section):
    lr: float = Field(default=1e-5, gt=0.0, le=1.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """Decoupled weight decay of AdamW."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1)."""
    eps: float = Field(default=1e-8, gt=0.0)
    """AdamW epsilon."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear warmup from 0 to `lr` over this many steps."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warmup, down to `lr * min_lr_ratio` at `trainer.max_steps`."""
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """Final learning rate as a fraction of `lr` (linear and cosine schedules)."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class CkptConfig(Section):
    interval: int = Field(default=50, ge=1)
    """Save a full checkpoint every this many steps (and at the last step)."""
    keep: int = Field(default=2, ge=1)
    """How many of the newest complete checkpoints to keep."""


class TrainerConfig(Section):
    max_steps: int = Field(default=100, ge=1)
    """Number of optimizer steps of the run."""
    micro_batch_tokens: int = Field(default=4096, ge=16)
    """Tokens per packed micro-batch (per rank); longer samples are set aside by the orchestrator
    (render/set_aside/too_long) and skipped by the trainer (loss/skipped_samples)."""
    grad_clip: float = Field(default=1.0, gt=0.0)
    """Clip the global gradient norm to this value."""
    num_processes: int = Field(default=1, ge=1, le=1024)
    """Trainer ranks on this node (torchrun --nproc-per-node); more than 1 uses FSDP2."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; "auto" picks CUDA when available."""
    batch_timeout_s: float = Field(default=1800.0, gt=0.0)
    """How long to wait for the orchestrator's next step batch before failing with a clear message."""
    loss: LossConfig = Field(default_factory=RLLossConfig)
    """The loss, chosen by `type` ("rl" default, or "sft")."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    ckpt: CkptConfig = Field(default_factory=CkptConfig)
    """Checkpointing."""
