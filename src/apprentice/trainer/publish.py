"""rl mode: publish the trainer's weights after every optimizer step for the inference server to load.

    OUTPUT/weights/step_{n}/    a Hugging Face directory (config, model.safetensors, tokenizer) + COMPLETE

Written through `fsio.atomic_dir` (temporary name, fsync, rename), with the marker written last inside it, so
a server never loads a partial model. Only the newest `keep` complete directories are kept.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apprentice.fsio import atomic_dir, write_text
from apprentice.trainer.export import full_state_dict

MARKER = "COMPLETE"


def weights_root(output_dir: Path) -> Path:
    return Path(output_dir) / "weights"


def weights_dir(output_dir: Path, step: int) -> Path:
    return weights_root(output_dir) / f"step_{step}"


def published_steps(output_dir: Path) -> list[int]:
    """Steps with complete published weights, ascending."""
    root = weights_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit() and (p / MARKER).is_file())


def latest_published(output_dir: Path) -> int:
    """The newest step with complete weights; 0 when none (the initial model)."""
    steps = published_steps(output_dir)
    return steps[-1] if steps else 0


def publish_weights(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path, step: int, keep: int
) -> Path | None:
    """Write OUTPUT/weights/step_{step}. Collective under FSDP2 (every rank calls); rank 0 writes."""
    state = full_state_dict(model)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    path = write_weights(model, state, tokenizer, output_dir, step, keep) if is_main else None
    if dist.is_initialized():
        dist.barrier()
    return path


def write_weights(
    model: PreTrainedModel, state: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, output_dir: Path,
    step: int, keep: int,
) -> Path:  # fmt: skip
    """Rank 0's half of `publish_weights`: write the gathered `state` as OUTPUT/weights/step_{step}, prune."""
    path = weights_dir(output_dir, step)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_text(tmp / MARKER, f'{{"step": {step}}}\n')
    prune_weights(output_dir, keep)
    return path


def prune_weights(output_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete weight directories (and leftovers of interrupted writes)."""
    root = weights_root(output_dir)
    for step in published_steps(output_dir)[:-keep]:
        shutil.rmtree(weights_dir(output_dir, step), ignore_errors=True)
    for leftover in root.glob(".step_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_weights_after(output_dir: Path, step: int) -> list[int]:
    """Delete published weights newer than `step` (a resumed trainer redoes those steps); the removed steps."""
    removed = [s for s in published_steps(output_dir) if s > step]
    for s in removed:
        shutil.rmtree(weights_dir(output_dir, s), ignore_errors=True)
    return removed
