"""The orchestrator -> trainer hand-off through the filesystem (DESIGN.md section 1).

    OUTPUT/rollouts/step_{n}/rank_{r}.safetensors   one file per trainer rank
    OUTPUT/rollouts/step_{n}/COMPLETE               JSON marker: world_size, sample/token counts, meta

A step directory is built under a temporary name, fsync'ed and renamed into place (apprentice.fsio), so a
reader never sees a partial step. Each rank file is a safetensors file (no pickle) holding the samples
flattened into columns, with a sha256 of the columns in its metadata so that corrupt or truncated files fail
with a `BatchError` naming the file (and the fix) instead of crashing deep inside torch.

A stored batch can never wedge a rerun on its content: samples the trainer cannot pack (longer than
trainer.micro_batch_tokens, or empty) are filtered out before writing (`drop_unpackable`, counted by the
orchestrator as render/set_aside/too_long), and the trainer applies the same filter to what it reads, with a
warning, for batches written under another limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from apprentice import fsio
from apprentice.errors import ApprenticeError
from apprentice.handoff.paths import MARKER, complete_steps, rollouts_root, step_name
from apprentice.handoff.stop import stopped_after
from apprentice.types import TrainingSample

log = logging.getLogger("apprentice.handoff")

FORMAT_VERSION = "1"
_COLUMNS = ("lengths", "advantages", "token_ids", "loss_mask", "logprobs")
# Written only when some sample carries per-token advantages (on-policy distillation): `has_token_advantages`
# [N] bool says which samples do, `token_advantages` [sum T] float32 holds theirs (the others' are unused).
# Written only when some sample carries the teacher's top-k (distill loss): `has_topk` [N] bool says which
# samples do, `topk_ids` [sum T, k] int32 and `topk_logprobs` [sum T, k] float32 hold theirs (-1 / 0.0 rows for
# the others). One k per file; samples with a narrower k are padded with -1 entries.
_TOPK_COLUMNS = ("has_topk", "topk_ids", "topk_logprobs")
_OPTIONAL_COLUMNS = ("has_token_advantages", "token_advantages", *_TOPK_COLUMNS)


class BatchError(ApprenticeError):
    """A step batch that cannot be used (corrupt, truncated, wrong shape); the message names the file."""


class BatchTimeoutError(ApprenticeError, TimeoutError):
    """No complete step batch appeared in time."""


def step_dir(output_dir: Path, step: int) -> Path:
    return rollouts_root(output_dir) / step_name(step)


def rank_file(output_dir: Path, step: int, rank: int) -> Path:
    return step_dir(output_dir, step) / f"rank_{rank}.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in _COLUMNS + tuple(c for c in _OPTIONAL_COLUMNS if c in tensors):
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_samples(samples: list[TrainingSample]) -> bytes:
    """Samples -> safetensors bytes: per-sample `lengths` [N] and `advantages` [N], per-token columns [sum T]."""
    tensors = {
        "lengths": torch.tensor([len(s) for s in samples], dtype=torch.int64),
        "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float64),
        "token_ids": torch.tensor([t for s in samples for t in s.token_ids], dtype=torch.int64),
        "loss_mask": torch.tensor([bool(m) for s in samples for m in s.loss_mask], dtype=torch.bool),
        "logprobs": torch.tensor([lp for s in samples for lp in s.logprobs], dtype=torch.float32),
    }
    if any(s.token_advantages is not None for s in samples):
        tensors["has_token_advantages"] = torch.tensor([s.token_advantages is not None for s in samples])
        tensors["token_advantages"] = torch.tensor(
            [a for s in samples for a in (s.token_advantages if s.token_advantages is not None else [0.0] * len(s))],
            dtype=torch.float32,
        )
    if any(s.teacher_topk_ids is not None for s in samples):
        tensors.update(_encode_topk(samples))
    return st_save(tensors, metadata={"format": FORMAT_VERSION, "sha256": _digest(tensors)})


def _encode_topk(samples: list[TrainingSample]) -> dict[str, torch.Tensor]:
    """The three top-k columns of `samples` (some of which carry targets)."""
    k = max(s.num_topk for s in samples)
    total = sum(len(s) for s in samples)
    ids = torch.full((total, k), -1, dtype=torch.int32)
    lps = torch.zeros((total, k), dtype=torch.float32)
    start = 0
    for s in samples:
        if s.teacher_topk_ids is not None and s.teacher_topk_logprobs is not None and s.num_topk:
            ids[start : start + len(s), : s.num_topk] = torch.tensor(s.teacher_topk_ids, dtype=torch.int32)
            lps[start : start + len(s), : s.num_topk] = torch.tensor(s.teacher_topk_logprobs, dtype=torch.float32)
        start += len(s)
    has = torch.tensor([s.teacher_topk_ids is not None for s in samples], dtype=torch.bool)
    return {"has_topk": has, "topk_ids": ids, "topk_logprobs": lps}


def decode_samples(data: bytes, source: str) -> list[TrainingSample]:
    """Inverse of `encode_samples`; every inconsistency is a `BatchError` naming `source`."""
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BatchError(f"{source}: not a valid step batch file (corrupt or truncated): {e}") from None
    missing = [c for c in _COLUMNS if c not in tensors]
    if missing:
        raise BatchError(f"{source}: step batch file lacks columns {missing}; rewrite it with write_step_batch")
    meta = _metadata(data)
    if meta.get("sha256") != _digest(tensors):
        raise BatchError(f"{source}: checksum mismatch, the file is corrupt")
    lengths = tensors["lengths"].tolist()
    total = sum(lengths)
    if any(n < 0 for n in lengths) or any(tensors[c].numel() != total for c in ("token_ids", "loss_mask", "logprobs")):
        raise BatchError(f"{source}: column lengths disagree with the per-sample lengths (total {total} tokens)")
    if tensors["advantages"].numel() != len(lengths):
        raise BatchError(f"{source}: {tensors['advantages'].numel()} advantages for {len(lengths)} samples")
    ids, mask, lps = tensors["token_ids"].tolist(), tensors["loss_mask"].tolist(), tensors["logprobs"].tolist()
    advantages = tensors["advantages"].tolist()
    per_token = _token_advantages(tensors, lengths, total, source)
    per_token_flags = tensors["has_token_advantages"].tolist() if per_token is not None else []
    topk = _topk_columns(tensors, lengths, total, source)
    samples, start = [], 0
    for i, (n, adv) in enumerate(zip(lengths, advantages, strict=True)):
        end = start + n
        token_adv = per_token[start:end] if per_token is not None and per_token_flags[i] else None
        topk_ids = topk_lps = None
        if topk is not None and topk[0][i]:
            topk_ids, topk_lps = topk[1][start:end], topk[2][start:end]
        try:
            samples.append(TrainingSample(ids[start:end], mask[start:end], lps[start:end], adv, token_adv,
                                          topk_ids, topk_lps))  # fmt: skip
        except ValueError as e:
            raise BatchError(f"{source}: sample {i} is invalid: {e}") from None
        start = end
    return samples


def _topk_columns(
    tensors: dict[str, torch.Tensor], lengths: list[int], total: int, source: str
) -> tuple[list[bool], list[list[int]], list[list[float]]] | None:
    """The optional top-k columns as (has_topk [N], ids [sum T][k], logprobs [sum T][k]); None when absent."""
    present = [c for c in _TOPK_COLUMNS if c in tensors]
    if not present:
        return None
    if len(present) != len(_TOPK_COLUMNS):
        raise BatchError(f"{source}: has top-k columns {present} without {sorted(set(_TOPK_COLUMNS) - set(present))}")
    ids, lps, has = tensors["topk_ids"], tensors["topk_logprobs"], tensors["has_topk"]
    if ids.dim() != 2 or ids.shape != lps.shape or ids.shape[0] != total or has.numel() != len(lengths):
        raise BatchError(
            f"{source}: top-k columns disagree with the per-sample lengths (topk_ids {list(ids.shape)}, "
            f"topk_logprobs {list(lps.shape)}, has_topk {has.numel()} for {len(lengths)} samples, {total} tokens)"
        )
    return has.tolist(), ids.tolist(), lps.tolist()


def _token_advantages(tensors: dict[str, torch.Tensor], lengths: list[int], total: int, source: str) -> list[float] | None:
    """The optional per-token advantage column (None when the file has none); BatchError when inconsistent."""
    if "token_advantages" not in tensors and "has_token_advantages" not in tensors:
        return None
    if "token_advantages" not in tensors or "has_token_advantages" not in tensors:
        raise BatchError(f"{source}: has one of {_OPTIONAL_COLUMNS} without the other")
    if tensors["token_advantages"].numel() != total or tensors["has_token_advantages"].numel() != len(lengths):
        raise BatchError(f"{source}: per-token advantage columns disagree with the per-sample lengths")
    values: list[float] = tensors["token_advantages"].tolist()
    return values


def _metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


def write_step_batch(
    output_dir: Path, step: int, per_rank: list[list[TrainingSample]], meta: dict[str, Any] | None = None
) -> Path:
    """Write OUTPUT/rollouts/step_{step}/rank_{r}.safetensors for every rank plus the COMPLETE marker, atomically.

    Raises FileExistsError when that step is already complete (a step is written once; a resumed orchestrator
    should start after `latest_step_batch`). An incomplete leftover directory of the same name is replaced.
    """
    if step < 1:
        raise ValueError(f"step numbers start at 1, got {step}")
    if not per_rank:
        raise ValueError("per_rank must hold one (possibly empty) list per trainer rank")
    final = step_dir(output_dir, step)
    if (final / MARKER).is_file():
        raise FileExistsError(f"{final} is already complete; step batches are written once")
    # An incomplete leftover of the same name (no marker) is replaced: nobody can be reading it as a batch.
    with fsio.atomic_dir(final) as tmp:
        for rank, samples in enumerate(per_rank):
            fsio.write_bytes(tmp / f"rank_{rank}.safetensors", encode_samples(samples))
        marker = {
            "step": step,
            "world_size": len(per_rank),
            "num_samples": [len(s) for s in per_rank],
            "num_tokens": [sum(len(x) for x in s) for s in per_rank],
            "meta": meta or {},
        }
        fsio.write_text(tmp / MARKER, json.dumps(marker))
    return final


def read_step_marker(output_dir: Path, step: int) -> dict[str, Any] | None:
    """The COMPLETE marker of a step (None while the step is not complete)."""
    path = step_dir(output_dir, step) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BatchError(f"{path}: corrupt completion marker ({e}). {_rewrite_fix(output_dir, step)}") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("world_size"), int):
        raise BatchError(f"{path}: completion marker lacks an integer world_size. {_rewrite_fix(output_dir, step)}")
    return marker


def _rewrite_fix(output_dir: Path, step: int) -> str:
    # The orchestrator resumes after the newest complete step, so a hole in the middle would never be refilled.
    return (
        f"Fix: delete {step_dir(output_dir, step)} and every later rollouts/step_* directory, then rerun: the "
        f"orchestrator writes them again (teacher answers already paid for come from its cache)"
    )


def read_step_batch(output_dir: Path, step: int, rank: int) -> list[TrainingSample]:
    """This rank's samples of a complete step. Raises BatchError (naming the file) for anything unusable."""
    marker = read_step_marker(output_dir, step)
    if marker is None:
        raise BatchError(f"{step_dir(output_dir, step)} is not a complete step batch (no {MARKER} marker)")
    if rank >= marker["world_size"]:
        raise BatchError(
            f"{step_dir(output_dir, step)} was written for {marker['world_size']} trainer rank(s) but rank {rank} "
            f"asked for it: the orchestrator must split batches for trainer.num_processes ranks"
        )
    path = rank_file(output_dir, step, rank)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BatchError(f"{path}: missing although the step is marked complete. {_rewrite_fix(output_dir, step)}") from None
    try:
        return decode_samples(data, str(path))
    except BatchError as e:
        raise BatchError(f"{e}. {_rewrite_fix(output_dir, step)}") from None


def step_batch_has_topk(output_dir: Path, step: int) -> bool:
    """Whether any rank file of the complete step `step` carries top-k columns (reads only the headers)."""
    marker = read_step_marker(output_dir, step)
    if marker is None:
        raise BatchError(f"{step_dir(output_dir, step)} is not a complete step batch (no {MARKER} marker)")
    for rank in range(marker["world_size"]):
        path = rank_file(output_dir, step, rank)
        with open(path, "rb") as f:
            header = f.read(int.from_bytes(f.read(8), "little"))
        try:
            if "topk_ids" in json.loads(header):
                return True
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BatchError(f"{path}: corrupt header. {_rewrite_fix(output_dir, step)}") from None
    return False


def drop_unpackable(samples: list[TrainingSample], micro_batch_tokens: int) -> tuple[list[TrainingSample], int]:
    """The samples the trainer can pack (1 to `micro_batch_tokens` tokens), in order, and how many were not.

    The orchestrator calls it before writing a step, so no stored batch holds a sample the trainer would
    refuse; the trainer calls it again on what it reads (a batch written under a larger limit).
    """
    kept = [s for s in samples if 0 < len(s) <= micro_batch_tokens]
    return kept, len(samples) - len(kept)


def wait_for_step_batch(
    output_dir: Path, step: int, rank: int, timeout_s: float, poll_s: float = 0.05
) -> list[TrainingSample]:
    """Poll until step `step` is complete, then read this rank's samples; BatchTimeoutError after `timeout_s`,
    RunStopped when the orchestrator announced it stopped before this step."""
    deadline = time.monotonic() + timeout_s
    delay = min(poll_s, 0.01)
    while read_step_marker(output_dir, step) is None:
        if (stop := stopped_after(output_dir)) is not None and stop.last < step:
            raise stop
        if time.monotonic() >= deadline:
            raise BatchTimeoutError(
                f"no step batch at {step_dir(output_dir, step)} after {timeout_s:.0f} s "
                f"(latest complete: step {latest_step_batch(output_dir)}). Is the orchestrator running and writing "
                f"to this output_dir? Raise trainer.batch_timeout_s if rollouts are just slow."
            )
        time.sleep(delay)
        delay = min(delay * 2, poll_s * 10)
    return read_step_batch(output_dir, step, rank)


def latest_step_batch(output_dir: Path) -> int:
    """The highest complete rollouts step (0 if none)."""
    return max((step for step, _ in complete_steps(rollouts_root(output_dir))), default=0)


def remove_partial_steps(output_dir: Path) -> list[Path]:
    """Delete `rollouts/.step_*.tmp-*` left by a writer that was killed mid-step; returns what was removed.

    Call only where nothing else can be writing rollouts (the orchestrator, its only writer, at its start):
    `fsio.atomic_dir` removes its temporary directory on an exception, but not when the process is killed.
    """
    leftovers = sorted(p for p in rollouts_root(output_dir).glob(".step_*.tmp-*") if p.is_dir())
    for path in leftovers:
        shutil.rmtree(path)
    return leftovers


def split_across_ranks(samples: list[TrainingSample], world_size: int) -> list[list[TrainingSample]]:
    """Balance tokens across ranks: longest first, each to the rank with the fewest tokens so far.

    Deterministic; every rank gets a list (possibly empty); each rank keeps the samples' original order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [0] * world_size
    owner = [0] * len(samples)
    for i in sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[i] = rank
        loads[rank] += len(samples[i])
    return [[s for i, s in enumerate(samples) if owner[i] == r] for r in range(world_size)]
