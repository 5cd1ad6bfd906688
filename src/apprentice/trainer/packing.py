"""Pack `TrainingSample`s into micro-batches of at most `trainer.micro_batch_tokens` tokens, with no padding.

Each micro-batch is one row [1, T] of concatenated samples. Position ids restart at 0 for every sample and
`cu_seqlens` marks the sample boundaries, so attention never crosses samples (see trainer/attention.py; the
transformers sdpa/eager/flash paths derive the same block-diagonal structure from the position ids).

Targets are shifted inside each sample: position j predicts token j+1 of the same sample, so the last
position of a sample has no target (mask False) and never predicts the next sample's first token.

Worked example, samples A = [a0 a1 a2] (mask 0 1 1) and B = [b0 b1] (mask 0 1):
    input_ids     a0 a1 a2 b0 b1
    position_ids   0  1  2  0  1
    target_ids    a1 a2  .  b1  .
    loss_mask      1  1  0  1  0
    cu_seqlens    [0, 3, 5]

The teacher's top-k targets (distill loss) shift the same way: row j of `teacher_topk_ids` is the sample's
row j+1 (the teacher's distribution over the target at j); rows without targets are all -1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from apprentice.errors import ApprenticeError
from apprentice.types import TrainingSample


class PackingError(ApprenticeError, ValueError):
    """A sample that cannot be packed (longer than a micro-batch)."""


@dataclass
class MicroBatch:
    """One packed row. Every per-token tensor is [1, T] (T <= micro_batch_tokens)."""

    input_ids: torch.Tensor
    """[1, T] int64 concatenated token ids."""
    position_ids: torch.Tensor
    """[1, T] int64 positions, restarting at 0 per sample."""
    target_ids: torch.Tensor
    """[1, T] int64 next token within the same sample (0 where there is none; masked)."""
    loss_mask: torch.Tensor
    """[1, T] bool: the target at this position is trained."""
    inference_logprobs: torch.Tensor
    """[1, T] float32 inference logprob of the target token (0.0 where none)."""
    advantages: torch.Tensor
    """[1, T] float32 advantage of the target at each position: the sample's per-token advantage of that target
    token where it has them (shifted like the mask), else the sample's advantage."""
    cu_seqlens: torch.Tensor
    """[S + 1] int32 cumulative sample lengths (varlen attention boundaries)."""
    max_seqlen: int
    """Length of the longest sample in the row."""
    teacher_topk_ids: torch.Tensor | None = None
    """[1, T, k] int64 the teacher's top-k ids for the target at each position (-1: padding, or no targets at
    that position); None when no sample of the row carries top-k targets."""
    teacher_topk_logprobs: torch.Tensor | None = None
    """[1, T, k] float32 the teacher's logprobs of `teacher_topk_ids` (ignored where the id is -1)."""
    num_pad_tokens: int = 0
    """Positions that hold no real sample (only the placeholder batch of a rank without data)."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device: torch.device) -> MicroBatch:
        """The row on `device`. To CUDA through pinned memory without blocking: a pageable copy would make the
        host wait for all the work already queued on the GPU, once per micro-batch."""
        pinned = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if pinned else t).to(device, non_blocking=pinned)

        moved: dict[str, Any] = {f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)
                                 if isinstance(getattr(self, f.name), torch.Tensor)}  # fmt: skip
        return dataclasses.replace(self, **moved)

    def model_kwargs(self) -> dict[str, object]:
        """Keyword arguments for a transformers causal LM forward over this packed row.

        The `cu_seq_lens_*`/`max_length_*` names are transformers' varlen kwargs: flash attention uses them
        directly and our CPU varlen attention reads them; sdpa/eager derive the same mask from position ids.
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "use_cache": False,
        }


def plan_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per bin, each bin's total length <= capacity. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def collate(samples: list[TrainingSample]) -> MicroBatch:
    """Concatenate samples into one packed row (no padding)."""
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    mask: list[bool] = []
    lps: list[float] = []
    adv: list[float] = []
    cu = [0]
    for s in samples:
        n = len(s)
        ids += s.token_ids
        pos += range(n)
        tgt += s.token_ids[1:] + [0]
        mask += [bool(m) for m in s.loss_mask[1:]] + [False]
        lps += s.logprobs[1:] + [0.0]
        adv += s.token_advantages[1:] + [0.0] if s.token_advantages is not None else [s.advantage] * n
        cu.append(cu[-1] + n)
    topk_ids, topk_lps = _collate_topk(samples)
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        target_ids=torch.tensor([tgt], dtype=torch.long),
        loss_mask=torch.tensor([mask], dtype=torch.bool),
        inference_logprobs=torch.tensor([lps], dtype=torch.float32),
        advantages=torch.tensor([adv], dtype=torch.float32),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max((len(s) for s in samples), default=0),
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_lps,
    )


def _collate_topk(samples: list[TrainingSample]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[1, T, k] top-k ids and logprobs of the packed row, shifted like the targets; (None, None) without any."""
    k = max((s.num_topk for s in samples), default=0)
    if k == 0:
        return None, None
    total = sum(len(s) for s in samples)
    ids = torch.full((total, k), -1, dtype=torch.long)
    lps = torch.zeros((total, k), dtype=torch.float32)
    start = 0
    for s in samples:
        if s.teacher_topk_ids is not None and s.teacher_topk_logprobs is not None and s.num_topk and len(s) > 1:
            # Position j of the row predicts token j+1 of the sample: sample rows 1.. fill row positions 0..n-2.
            ids[start : start + len(s) - 1, : s.num_topk] = torch.tensor(s.teacher_topk_ids[1:], dtype=torch.long)
            lps[start : start + len(s) - 1, : s.num_topk] = torch.tensor(s.teacher_topk_logprobs[1:])
        start += len(s)
    return ids.unsqueeze(0), lps.unsqueeze(0)


def placeholder_batch() -> MicroBatch:
    """A one-token, fully masked row: lets a rank with no (more) data join the step's collectives and backward."""
    mb = collate([TrainingSample([0], [False], [0.0], 0.0)])
    mb.num_pad_tokens = 1
    return mb


def pack_samples(samples: list[TrainingSample], micro_batch_tokens: int) -> list[MicroBatch]:
    """Pack samples into as few rows of <= `micro_batch_tokens` tokens as first-fit decreasing finds."""
    for i, s in enumerate(samples):
        if len(s) > micro_batch_tokens:
            raise PackingError(
                f"sample {i} has {len(s)} tokens, more than trainer.micro_batch_tokens = {micro_batch_tokens}; "
                f"raise trainer.micro_batch_tokens or cap orchestrator.sampling.max_tokens"
            )
    empty = [i for i, s in enumerate(samples) if len(s) == 0]
    if empty:
        raise PackingError(f"samples {empty[:5]} have no tokens; the orchestrator must drop empty samples")
    bins = plan_bins([len(s) for s in samples], micro_batch_tokens)
    return [collate([samples[i] for i in b]) for b in bins]
