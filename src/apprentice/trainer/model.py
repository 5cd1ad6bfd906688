"""Load the student: any causal LM transformers can load (HF id or local directory), offline."""

from __future__ import annotations

import importlib.util

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from apprentice.config.model import ModelConfig
from apprentice.trainer import attention

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on GPU and float32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[cfg.dtype]


def resolve_attention(cfg: ModelConfig, device: torch.device) -> str:
    """The attention backend: the config's choice, else flash-attn varlen on GPU when installed, else ours.

    Every choice is correct for packed rows; they differ only in speed (see trainer/attention.py).
    """
    if cfg.attn_implementation is not None:
        name = cfg.attn_implementation
    elif device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        name = "flash_attention_2"
    else:
        name = attention.NAME
    if name == attention.NAME:
        attention.register()
    return name


def load_model(cfg: ModelConfig, device: torch.device) -> PreTrainedModel:
    """The student in training mode on `device`, with packing-aware attention and no KV cache."""
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name,
        dtype=resolve_dtype(cfg, device),
        attn_implementation=resolve_attention(cfg, device),
        trust_remote_code=cfg.trust_remote_code,
        gguf_file=cfg.gguf_file,
    )
    if cfg.gguf_file:
        forget_gguf_origin(model)
    model.config.use_cache = False
    if cfg.activation_checkpointing:
        # Non-reentrant checkpointing composes with FSDP2 and with inputs that do not require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)  # type: ignore[arg-type]  # transformers' stub types .to() for dtype only
    model.train()
    return model


def forget_gguf_origin(model: PreTrainedModel) -> None:
    """Let a model loaded with `gguf_file=` be saved (checkpoints, the final export).

    transformers dequantises GGUF weights to plain tensors on load but keeps the model marked as quantized, and
    `save_pretrained` then refuses it; dropping the marker is all that stands between it and a normal save.
    """
    setattr(model, "hf_quantizer", None)  # noqa: B010  # transformers types the attribute as a module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
