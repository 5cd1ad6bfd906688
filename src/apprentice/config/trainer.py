"""`[trainer]`, `[trainer.loss]`, `[trainer.optim]`, `[trainer.ckpt]`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

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


class DistillLossConfig(Section):
    """A divergence between the teacher's top-k distribution and the student's, at every loss position that has
    top-k targets (TrainingSample.teacher_topk_*); the plain NLL of the sampled token where none exist.

    Both distributions live on the same k + 1 outcomes: the teacher's top-k ids plus one tail bucket holding
    everything else (the teacher's tail is 1 - its top-k mass, the student's is its exact mass outside those
    ids). Computed chunk by chunk through the lm_head: memory per token is O(k), no [T, V] tensor (training.md).
    """

    type: Literal["distill"] = "distill"
    """Loss kind; "distill" learns the teacher's top-k distribution (soft targets) at each position."""
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """"forward_kl": KL(teacher || student), mass-covering (what top-k distillation usually trains);
    "reverse_kl": KL(student || teacher), mode-seeking; "jsd": GKD's generalized Jensen-Shannon divergence
    with mixture weight `beta`."""
    beta: float = Field(default=0.5, gt=0.0, lt=1.0)
    """"jsd" only: GKD's beta, JSD_beta = beta KL(teacher || M) + (1 - beta) KL(student || M) with
    M = beta teacher + (1 - beta) student. Towards 0 it behaves like a (scaled) forward KL, towards 1 like a
    (scaled) reverse KL; those ends are the other two divergences."""
    sft_weight: float = Field(default=0.0, ge=0.0)
    """Weight of the sampled token's NLL added at positions with top-k targets (0: the divergence alone).
    Positions without targets always train on the NLL with weight 1."""


def _loss_type(value: Any) -> Any:
    """The union tag. A `[trainer.loss]` table without `type` is the default "rl" loss (DESIGN.md section 3)."""
    return value.get("type", "rl") if isinstance(value, dict) else getattr(value, "type", None)


LossConfig = Annotated[
    Annotated[RLLossConfig, Tag("rl")] | Annotated[SFTLossConfig, Tag("sft")]
    | Annotated[DistillLossConfig, Tag("distill")],
    Discriminator(
        _loss_type,
        custom_error_type="loss_type",
        custom_error_message='trainer.loss.type must be "rl" (rl mode), "sft" or "distill" (the teacher\'s top-k '
        'as soft targets): set it under [trainer.loss]',
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
    """Trainer ranks per node (torchrun --nproc-per-node); more than 1 rank in all uses FSDP2."""
    num_nodes: int = Field(default=1, ge=1, le=4096)
    """Machines the trainer spans (torchrun --nnodes); the world is num_nodes x num_processes ranks, and the
    orchestrator splits every step batch for the whole world. More than 1 needs `rdzv_endpoint` and an
    output_dir on a filesystem every node shares (docs/multinode.md)."""
    rdzv_endpoint: str | None = Field(default=None, pattern=r"^[^\s:]+:[0-9]{1,5}$")
    """HOST:PORT where the nodes' torchrun agents meet (c10d rendezvous), e.g. "node0.cluster:29500": a
    machine every node can reach, usually node 0. Required when num_nodes > 1, unused otherwise."""
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"
    """Numerics of training. "bf16-mixed": fp32 master weights and AdamW state, forward/backward in bfloat16,
    gradients reduced and accumulated in fp32 (FSDP2 MixedPrecisionPolicy). "fp32": everything fp32.
    "auto": bf16-mixed on CUDA, fp32 on CPU (CPU bf16 matmuls are slow). "bf16": weights and optimizer
    state in bfloat16, an explicit opt-in that loses updates smaller than half a bf16 ulp (at lr 1e-5 most
    weights never move); it warns."""
    compile: bool = False
    """torch.compile each transformer block (faster steps on GPU after a compile warmup of a minute or so)."""
    logprob_chunk_tokens: int = Field(default=1024, ge=0)
    """Tokens per chunk when computing target log-probs and the loss through the lm_head, so that [T, V]
    fp32 logits of a whole micro-batch never exist at once (forward and backward). 0 computes the whole
    micro-batch at once (more memory, same values)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; "auto" picks CUDA when available."""
    batch_timeout_s: float = Field(default=1800.0, gt=0.0)
    """How long to wait for the orchestrator's next step batch before failing with a clear message."""
    weights_keep: int = Field(default=3, ge=1)
    """rl mode: how many of the newest published OUTPUT/weights/step_{n} directories to keep (at least
    orchestrator.max_async_level + 2 are kept, so weights the server may still be loading stay on disk)."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads of each trainer rank (torch's intra-op pool), in every command. Default: `apprentice rl` gives
    the trainer the cores the inference server does not get (apprentice/cpu_budget.py); other commands leave
    torch's default (OMP_NUM_THREADS, else every core; one per rank when one node runs several)."""
    weight_broadcast: Literal["auto", "filesystem", "collective"] = "auto"
    """rl mode: how each step's weights reach the inference server. "filesystem": OUTPUT/weights/step_{n} every
    step, which the server reads (works across machines on a shared filesystem, any backend). "collective": sent
    from the trainer's memory to the server's over a torch.distributed group (gloo), no file per step; weights
    are written to disk only at checkpoint steps (what a resumed run starts from). Needs `apprentice serve`
    (inference.backend = "builtin" or a student endpoint that is one) or the vLLM server `apprentice rl` starts
    (backend = "vllm": its workers receive through apprentice's worker extension) reachable from the trainer.
    "auto": collective with the builtin server the run starts ([inference] backend = "builtin"; measured faster,
    see docs/rl.md), filesystem otherwise."""
    loss: LossConfig = Field(default_factory=RLLossConfig)
    """The loss, chosen by `type` ("rl" default, "sft", or "distill")."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    ckpt: CkptConfig = Field(default_factory=CkptConfig)
    """Checkpointing."""

    @property
    def world_size(self) -> int:
        """Trainer ranks in all: what the orchestrator splits each step batch for."""
        return self.num_nodes * self.num_processes

    @model_validator(mode="after")
    def _rendezvous_for_nodes(self) -> TrainerConfig:
        if self.num_nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"trainer.num_nodes = {self.num_nodes} needs trainer.rdzv_endpoint = \"HOST:PORT\" (a machine all "
                f"nodes reach, usually node 0, e.g. \"node0:29500\"); see docs/multinode.md"
            )
        return self
