"""The one typed record that crosses the orchestrator -> trainer boundary (DESIGN.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainingSample:
    """One packed-ready training sequence; all per-token lists have the same length T.

    There is deliberately no prompt/completion split: `loss_mask` alone says which tokens the student learns
    to produce, so multi-turn samples (assistant turns interleaved with tool/user tokens) need no special case.
    """

    token_ids: list[int]
    """[T] token ids exactly as the student sees them at inference time."""
    loss_mask: list[bool]
    """[T] True only on tokens the student should learn to produce (assistant output and its end-of-turn)."""
    logprobs: list[float]
    """[T] inference logprobs of each token; 0.0 where none exist (distill mode, prompt tokens)."""
    advantage: float = 1.0
    """Sequence-level advantage (rl mode); 1.0 in distill mode."""
    token_advantages: list[float] | None = None
    """[T] optional per-token advantage; where set, the rl loss uses it instead of `advantage` on every position.
    On-policy distillation fills it (kl_coef * (teacher_lp - student_lp) + reward_coef * group advantage, on
    loss-mask positions; 0.0 elsewhere). None: every token carries the sequence `advantage`."""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"TrainingSample lists must have equal lengths, got token_ids={n}, "
                f"loss_mask={len(self.loss_mask)}, logprobs={len(self.logprobs)}"
            )
        if self.token_advantages is not None and len(self.token_advantages) != n:
            raise ValueError(f"TrainingSample.token_advantages has {len(self.token_advantages)} values for {n} tokens")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)
