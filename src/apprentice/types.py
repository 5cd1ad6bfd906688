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

    teacher_topk_ids: list[list[int]] | None = None
    """[T][k] the teacher's top-k token ids in the STUDENT's vocabulary for the token at position t (aligned with
    `logprobs[t]`: the distribution over token_ids[t] given token_ids[:t]). A row of all -1: no soft targets at t
    (the loss uses the NLL of token_ids[t]); -1 inside a row is padding. Non-loss rows are all -1."""
    teacher_topk_logprobs: list[list[float]] | None = None
    """[T][k] the teacher's natural-log probabilities of those ids (finite, <= 0; 0.0 at padding). The tail mass
    at t is 1 - sum(exp(valid entries)). Both top-k fields are None, or both set with T rows of one width k."""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"TrainingSample lists must have equal lengths, got token_ids={n}, "
                f"loss_mask={len(self.loss_mask)}, logprobs={len(self.logprobs)}"
            )
        if self.token_advantages is not None and len(self.token_advantages) != n:
            raise ValueError(f"TrainingSample.token_advantages has {len(self.token_advantages)} values for {n} tokens")
        ids, lps = self.teacher_topk_ids, self.teacher_topk_logprobs
        if (ids is None) != (lps is None):
            raise ValueError("TrainingSample.teacher_topk_ids and teacher_topk_logprobs must both be set or both None")
        if ids is not None and lps is not None:
            if len(ids) != n or len(lps) != n:
                raise ValueError(f"TrainingSample top-k targets have {len(ids)} / {len(lps)} rows for {n} tokens")
            widths = {len(row) for row in ids} | {len(row) for row in lps}
            if len(widths) > 1:
                raise ValueError(f"TrainingSample top-k rows must share one width k, got widths {sorted(widths)}")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)
