"""Model loading for `apprentice serve` and the checks before a weight reload (`POST /v1/load_weights`).

A reload directory is a Hugging Face model directory. The trainer publishes `OUTPUT/weights/step_{n}/` with a
`COMPLETE` marker written last (DESIGN.md), so a directory named `step_{n}` without the marker is refused as
still being written; any other directory is accepted when its config and every weight file it names exist
(a sharded checkpoint's index lists its shards). Loading errors (a truncated safetensors file, a config of
another architecture) are reported as `WeightsError` with the directory named, never as a 500.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

MARKER = "COMPLETE"
"""Completion marker of a trainer-published weights directory (same name as checkpoints and rollouts)."""

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_STEP_DIR = re.compile(r"step_\d+")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class WeightsError(Exception):
    """A reload directory that cannot be served; the message names the directory and what is wrong."""


def load_causal_lm(
    path: str | Path, torch_dtype: torch.dtype, device: str | torch.device, *, trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> Any:  # fmt: skip
    """The one place `serve` builds a model from a directory (initial model and reloads); eval mode on `device`.

    Through apprentice.loader, the loader the trainer uses too. `gguf_file` is a GGUF file inside `path`
    (the initial model only: published weights are plain safetensors).
    """
    from apprentice.loader import load_causal_lm as shared_loader

    return shared_loader(path, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code, gguf_file=gguf_file)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto": bfloat16 on CUDA, float32 elsewhere."""
    return DTYPES[dtype] or (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def check_weights_dir(path: Path) -> None:
    """Raise WeightsError unless `path` looks like a complete HF model directory (see the module docstring)."""
    if not path.is_dir():
        raise WeightsError(f"weights directory {str(path)!r} does not exist (or is not a directory)")
    if _STEP_DIR.fullmatch(path.name) and not (path / MARKER).is_file():
        raise WeightsError(f"weights directory {str(path)!r} has no {MARKER} marker: the trainer has not finished "
                           f"writing it; retry once the marker exists")  # fmt: skip
    if not (path / "config.json").is_file():
        raise WeightsError(f"weights directory {str(path)!r} has no config.json: not a Hugging Face model directory")
    if any((path / name).is_file() for name in _SINGLE_FILES):
        return
    for name in _INDEXES:
        index = path / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, AttributeError) as e:
                raise WeightsError(f"{index}: not a valid weight index ({e})") from None
            missing = sorted(s for s in shards if not (path / s).is_file())
            if missing:
                raise WeightsError(f"weights directory {str(path)!r} is incomplete: missing {', '.join(missing)}")
            return
    raise WeightsError(f"weights directory {str(path)!r} has no weights (expected {' or '.join(_SINGLE_FILES)} "
                       f"or a sharded index)")  # fmt: skip


def load_reload(path: Path, current: Any, *, trust_remote_code: bool = False) -> Any:
    """Load the weights at `path` with the served model's dtype and device; WeightsError if unusable."""
    check_weights_dir(path)
    param = next(current.parameters())
    try:
        model = load_causal_lm(path, param.dtype, param.device, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # truncated/garbled files, unknown architectures
        raise WeightsError(f"weights directory {str(path)!r} could not be loaded: {type(e).__name__}: {e}") from None
    if model.config.vocab_size != current.config.vocab_size:
        raise WeightsError(f"{path}: vocab size {model.config.vocab_size} differs from the served model's "
                           f"{current.config.vocab_size}; load_weights swaps weights of the same model only")  # fmt: skip
    return model
