"""The one typed record that crosses the orchestrator -> trainer boundary (DESIGN.md section 4)."""

from __future__ import annotations

import math
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
    """[T][k] the teacher's top-k token ids in the STUDENT's vocabulary for the token at position t (aligned
    like `logprobs[t]`: the distribution over token_ids[t] given token_ids[:t]); the distill loss's soft
    targets. A row of all -1 means no soft targets at t (the loss uses the NLL of token_ids[t] there); -1
    entries inside a row are padding (fewer than k candidates). Only loss-mask positions may have targets;
    valid ids in a row are distinct. None (with `teacher_topk_logprobs`): no soft targets in this sample."""
    teacher_topk_logprobs: list[list[float]] | None = None
    """[T][k] the teacher's natural-log probabilities of `teacher_topk_ids` (finite, <= 0 on valid entries;
    padding entries are ignored, 0.0 by convention). The teacher's tail mass at t, one bucket for every other
    id, is 1 - sum(exp(valid entries)) clamped to >= 0. Set together with `teacher_topk_ids`, same [T][k]."""

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"TrainingSample lists must have equal lengths, got token_ids={n}, "
                f"loss_mask={len(self.loss_mask)}, logprobs={len(self.logprobs)}"
            )
        if self.token_advantages is not None and len(self.token_advantages) != n:
            raise ValueError(f"TrainingSample.token_advantages has {len(self.token_advantages)} values for {n} tokens")
        if self.teacher_topk_ids is not None or self.teacher_topk_logprobs is not None:
            self._check_topk()

    def _check_topk(self) -> None:
        """Shapes, padding and values of the top-k targets; a ValueError naming the position otherwise."""
        ids, lps = self.teacher_topk_ids, self.teacher_topk_logprobs
        if ids is None or lps is None:
            raise ValueError("TrainingSample.teacher_topk_ids and teacher_topk_logprobs must be both set or both None")
        n = len(self.token_ids)
        if len(ids) != n or len(lps) != n:
            raise ValueError(
                f"TrainingSample top-k targets need one row per token: {n} tokens, teacher_topk_ids has "
                f"{len(ids)} rows, teacher_topk_logprobs {len(lps)}"
            )
        k = len(ids[0]) if n else 0
        for t, (id_row, lp_row) in enumerate(zip(ids, lps, strict=True)):
            if len(id_row) != k or len(lp_row) != k:
                raise ValueError(
                    f"TrainingSample top-k rows must all have width k = {k} (one k per run); position {t} has "
                    f"{len(id_row)} ids and {len(lp_row)} logprobs"
                )
            valid = [(i, lp) for i, lp in zip(id_row, lp_row, strict=True) if i != -1]
            if not valid:
                continue
            if not self.loss_mask[t]:
                raise ValueError(f"TrainingSample position {t} has top-k targets but is not in the loss mask; "
                                 f"rows outside the loss mask must be all -1")
            if any(i < -1 for i, _ in valid):
                raise ValueError(f"TrainingSample.teacher_topk_ids[{t}] = {id_row}: ids are >= 0, or -1 for padding")
            if len({i for i, _ in valid}) != len(valid):
                raise ValueError(f"TrainingSample.teacher_topk_ids[{t}] = {id_row} repeats an id; valid ids are distinct")
            if not all(math.isfinite(lp) and lp <= 0.0 for _, lp in valid):
                raise ValueError(
                    f"TrainingSample.teacher_topk_logprobs[{t}] = {lp_row}: logprobs of valid ids must be finite "
                    f"and <= 0"
                )

    @property
    def num_topk(self) -> int:
        """k, the width of the top-k target rows (0 without targets)."""
        return len(self.teacher_topk_ids[0]) if self.teacher_topk_ids else 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)
