"""Export the student as a Hugging Face directory (config, safetensors, tokenizer, generation config).

Used for OUTPUT/final and, in rl mode, OUTPUT/weights/step_{n}. The directory is built under a temporary
name and renamed into place with a `.complete` marker inside, so an inference server polling for it never
loads a partial model.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from apprentice import fsio

EXPORT_MARKER = ".complete"


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


def export_hf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path | None:
    """Write `model` + `tokenizer` as a loadable HF directory at `path`, atomically (replacing an old one).

    Collective when torch.distributed is initialised: call it on every rank; rank 0 writes and returns the
    path, other ranks return None after the write is done.
    """
    path = Path(path)
    state = full_state_dict(model)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        # fsio.atomic_dir: standard file modes (mkdtemp alone would leave the directory 0700), fsync, rename.
        with fsio.atomic_dir(path) as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            if model.generation_config is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / EXPORT_MARKER).write_text("")
    if dist.is_initialized():
        dist.barrier()
    return path if is_main else None

