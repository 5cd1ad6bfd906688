"""The one Hugging Face directory writer: OUTPUT/final and, in rl mode, OUTPUT/weights/step_{n}.

A directory holds config, model.safetensors, generation config, tokenizer, a MANIFEST.json (size and sha256
of every file) and the COMPLETE marker, written last. It is built under a temporary name, every file and the
directory fsync'ed, and renamed into place (`apprentice.fsio.atomic_dir`), so an inference server polling for
it never loads a partial model, and a power cut leaves the old directory or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apprentice import fsio
from apprentice.handoff.manifest import write_manifest
from apprentice.handoff.paths import MARKER, final_dir

FORMAT = 1
"""Format of a written directory's marker and manifest."""


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU weights. Collective under FSDP2 (every rank must call); only rank 0 gets the tensors."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state: dict[str, torch.Tensor] = dict(get_model_state_dict(model, options=options))  # type: ignore[arg-type]
    # Gathered shards are separate copies, so save_pretrained cannot see that tied weights (lm_head = embeddings)
    # are one tensor; drop the tied copies as transformers itself would.
    tied: dict[str, str] = dict(getattr(model, "all_tied_weights_keys", None) or {})
    for target, source in tied.items():
        if target in state and source in state:
            del state[target]
    return state


def write_hf_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, *, step: int | None = None
) -> Path | None:
    """Write `model` + `tokenizer` as a loadable HF directory at `path`, atomically (replacing an old one).

    Collective when torch.distributed is initialised: call it on every rank; rank 0 writes and returns the
    path, other ranks return None after the write is done. `step` goes into the marker.
    """
    path = Path(path)
    state = full_state_dict(model)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        with fsio.atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp, FORMAT)
            fsio.write_text(tmp / MARKER, json.dumps({"step": step, "format": FORMAT}) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return path if is_main else None


def export_final(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, output_dir: Path, *, same_as: Path | None = None
) -> Path | None:
    """OUTPUT/final: the trained student. Collective (see `write_hf_dir`).

    `same_as`: a complete directory this process wrote from the same weights (rl mode: the last step's published
    weights); final/ is then made of hard links to its files (a copy where the filesystem has none) instead of
    gathering, serializing and hashing the model a second time at the end of the run.
    """
    if same_as is None:
        return write_hf_dir(model, tokenizer, final_dir(output_dir))
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        with fsio.atomic_dir(final_dir(output_dir)) as tmp:
            for source in sorted(p for p in Path(same_as).rglob("*") if p.is_file() and p.name != MARKER):
                target = tmp / source.relative_to(same_as)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, target)
                except OSError:  # no hard links here (another filesystem, some network mounts)
                    shutil.copy2(source, target)
            fsio.write_text(tmp / MARKER, json.dumps({"step": None, "format": FORMAT}) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return final_dir(output_dir) if is_main else None
