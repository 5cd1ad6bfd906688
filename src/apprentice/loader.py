"""The one way apprentice loads a causal LM: the trainer's student and the model `apprentice serve` runs.

Both go through `load_causal_lm`, so a model that trains also serves: the same dtype rule, `trust_remote_code`
and `gguf_file` handling, and the same offline behaviour (HF_HUB_OFFLINE is honoured by transformers).
Who decides the dtype differs: the trainer passes the dtype of its master weights (trainer.precision), the
server its `--dtype` ("auto": bfloat16 on CUDA, float32 on CPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(choice: str, device: torch.device | str) -> torch.dtype:
    """ "auto" is bfloat16 on CUDA and float32 elsewhere; any other choice is a name in DTYPES."""
    if choice == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[choice]


def load_causal_lm(
    name: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> Any:
    """A transformers causal LM (HF id or local directory, optionally a GGUF file inside it) on `device`.

    The model comes back in eval mode with the KV cache left as configured; callers switch modes.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model: Any = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if gguf_file:
        forget_gguf_origin(model)
    return model.to(device).eval()


def forget_gguf_origin(model: Any) -> None:
    """Let a model loaded with `gguf_file=` be saved (checkpoints, exports).

    transformers dequantises GGUF weights to plain tensors on load but keeps the model marked as quantized, and
    `save_pretrained` then refuses it; dropping the marker is all that stands between it and a normal save.
    """
    setattr(model, "hf_quantizer", None)  # noqa: B010  # transformers types the attribute as a module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
