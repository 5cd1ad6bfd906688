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

Shared prompts (`share_prompts`, on with the CPU varlen attention): samples of one row whose untrained
beginnings are the same tokens (the samples of one GRPO group: one prompt, several answers) compute that
prefix once. The row holds the prefix as its own segment, then each sample's rest ("tail", from its last
untrained token on) as a segment at positions continuing the prefix's; `prefix_of` names, per segment, the
segment whose keys and values it attends to before its own (-1: none). Every trained position sees exactly
the keys it would see in its own sample, so logprobs and gradients are those of unshared packing (the prefix's
gradient is the sum over its tails, as autograd gives it); an RL batch of short answers computes about half the
tokens. Only the prefix before the last untrained token is shared: that token predicts each sample's first
trained token, so it stays in every tail.

    samples A = [p0 p1 a2 a3] and B = [p0 p1 b2] (mask 0 0 1 1 / 0 0 1): shared prefix [p0] (the last untrained
    token p1 stays in each tail)
    input_ids     p0 | p1 a2 a3 | p1 b2
    position_ids   0 |  1  2  3 |  1  2
    target_ids    p1 | a2 a3  . | b2  .
    loss_mask      0 |  1  1  0 |  1  0
    cu_seqlens    [0, 1, 4, 6]      prefix_of [-1, 0, 0]

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

PREFIX_KWARG = "apprentice_prefix_of"
"""The forward keyword (passed through transformers to the attention function) carrying `MicroBatch.prefix_of`."""


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
    prefix_of: list[int] | None = None
    """Per segment of `cu_seqlens`, the segment whose keys and values it attends to before its own (-1: none);
    None when no segment continues another (see the module docstring)."""
    num_shared_tokens: int = 0
    """Sample tokens not in the row because a shared prefix holds them once for several samples."""

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
            **({} if self.prefix_of is None else {PREFIX_KWARG: self.prefix_of}),
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


@dataclass
class _Group:
    """Samples packed behind one shared prefix of `prefix` tokens (0: each sample whole)."""

    members: list[int]
    prefix: int

    def size(self, lengths: list[int]) -> int:
        return self.prefix + sum(lengths[i] - self.prefix for i in self.members)


def collate(samples: list[TrainingSample]) -> MicroBatch:
    """Concatenate samples into one packed row (no padding), each sample whole."""
    return _collate([(samples, 0)])


def _collate(groups: list[tuple[list[TrainingSample], int]]) -> MicroBatch:
    """One packed row of groups (samples, prefix): with prefix > 0 the samples' first `prefix` tokens (identical,
    untrained, and not the last untrained one) are one shared segment that every sample of the group continues."""
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    mask: list[bool] = []
    lps: list[float] = []
    adv: list[float] = []
    cu = [0]
    prefix_of: list[int] = []
    segments: list[tuple[TrainingSample | None, int]] = []  # per segment: its sample (None: a shared prefix), first token
    shared = 0
    for samples, prefix in groups:
        if prefix:  # the prefix segment: untrained (its last target is the first tail token, masked)
            head = samples[0]
            ids += head.token_ids[:prefix]
            pos += range(prefix)
            tgt += head.token_ids[1 : prefix + 1]
            mask += [False] * prefix
            lps += [0.0] * prefix
            adv += [0.0] * prefix
            cu.append(cu[-1] + prefix)
            prefix_of.append(-1)
            segments.append((None, prefix))
            shared += prefix * (len(samples) - 1)
        owner = len(prefix_of) - 1 if prefix else -1
        for s in samples:
            n = len(s)
            ids += s.token_ids[prefix:]
            pos += range(prefix, n)
            tgt += s.token_ids[prefix + 1 :] + [0]
            mask += [bool(m) for m in s.loss_mask[prefix + 1 :]] + [False]
            lps += s.logprobs[prefix + 1 :] + [0.0]
            adv += s.token_advantages[prefix + 1 :] + [0.0] if s.token_advantages is not None else [s.advantage] * (n - prefix)
            cu.append(cu[-1] + n - prefix)
            prefix_of.append(owner)
            segments.append((s, prefix))
    topk_ids, topk_lps = _collate_topk(segments, cu[-1])
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        target_ids=torch.tensor([tgt], dtype=torch.long),
        loss_mask=torch.tensor([mask], dtype=torch.bool),
        inference_logprobs=torch.tensor([lps], dtype=torch.float32),
        advantages=torch.tensor([adv], dtype=torch.float32),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max((len(s) for samples, _ in groups for s in samples), default=0),
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_lps,
        prefix_of=prefix_of if any(p >= 0 for p in prefix_of) else None,
        num_shared_tokens=shared,
    )


def _collate_topk(segments: list[tuple[TrainingSample | None, int]], total: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """[1, T, k] top-k ids and logprobs of the packed row, shifted like the targets; (None, None) without any.

    `segments`: per segment, its sample and the sample token it begins at; (None, n) for a shared prefix of n
    tokens (untrained: no targets)."""
    k = max((s.num_topk for s, _ in segments if s is not None), default=0)
    if k == 0:
        return None, None
    ids = torch.full((total, k), -1, dtype=torch.long)
    lps = torch.zeros((total, k), dtype=torch.float32)
    row = 0
    for s, first in segments:
        if s is None:
            row += first
            continue
        n = len(s) - first
        if s.teacher_topk_ids is not None and s.teacher_topk_logprobs is not None and s.num_topk and n > 1:
            # Position j of the segment predicts sample token first+j+1: sample rows first+1.. fill positions 0..n-2.
            ids[row : row + n - 1, : s.num_topk] = torch.tensor(s.teacher_topk_ids[first + 1 :], dtype=torch.long)
            lps[row : row + n - 1, : s.num_topk] = torch.tensor(s.teacher_topk_logprobs[first + 1 :])
        row += n
    return ids.unsqueeze(0), lps.unsqueeze(0)


def placeholder_batch() -> MicroBatch:
    """A one-token, fully masked row: lets a rank with no (more) data join the step's collectives and backward."""
    mb = collate([TrainingSample([0], [False], [0.0], 0.0)])
    mb.num_pad_tokens = 1
    return mb


def shareable_prefix(sample: TrainingSample) -> int:
    """Tokens at the start of `sample` that a shared prefix may hold: those before its last untrained token
    (that one predicts the first trained token, so each sample keeps its own)."""
    first_trained = next((i for i, m in enumerate(sample.loss_mask) if m), len(sample))
    return max(0, first_trained - 1)


def _groups(samples: list[TrainingSample], capacity: int, share_prompts: bool) -> list[_Group]:
    """Samples grouped by identical shareable prefixes (each sample alone without `share_prompts`), groups
    larger than `capacity` split; a prefix shared by one sample is no prefix."""
    if not share_prompts:
        return [_Group([i], 0) for i in range(len(samples))]
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        by_prefix.setdefault(tuple(s.token_ids[: shareable_prefix(s)]), []).append(i)
    lengths = [len(s) for s in samples]
    groups: list[_Group] = []
    for key, members in by_prefix.items():
        if not key:  # nothing to share: each sample packs on its own
            groups += [_Group([i], 0) for i in members]
            continue
        current = _Group([], len(key))
        for i in members:
            if current.members and _Group([*current.members, i], current.prefix).size(lengths) > capacity:
                groups.append(current)
                current = _Group([], len(key))
            current.members.append(i)
        groups.append(current)
    return [g if len(g.members) > 1 else _Group(g.members, 0) for g in groups]


def pack_samples(samples: list[TrainingSample], micro_batch_tokens: int, *, share_prompts: bool = False) -> list[MicroBatch]:
    """Pack samples into as few rows of <= `micro_batch_tokens` tokens as first-fit decreasing finds.

    `share_prompts`: samples with the same untrained beginning compute it once (module docstring); only for an
    attention that reads `prefix_of` (trainer/attention.py), which the trainer checks."""
    for i, s in enumerate(samples):
        if len(s) > micro_batch_tokens:
            raise PackingError(
                f"sample {i} has {len(s)} tokens, more than trainer.micro_batch_tokens = {micro_batch_tokens}; "
                f"raise trainer.micro_batch_tokens or cap orchestrator.sampling.max_tokens"
            )
    empty = [i for i, s in enumerate(samples) if len(s) == 0]
    if empty:
        raise PackingError(f"samples {empty[:5]} have no tokens; the orchestrator must drop empty samples")
    lengths = [len(s) for s in samples]
    groups = _groups(samples, micro_batch_tokens, share_prompts)
    bins = plan_bins([g.size(lengths) for g in groups], micro_batch_tokens)
    return [_collate([([samples[i] for i in groups[g].members], groups[g].prefix) for g in b]) for b in bins]
