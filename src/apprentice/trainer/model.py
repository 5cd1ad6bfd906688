"""Load the student for training: any causal LM transformers can load (HF id or local directory), offline.

Loading goes through `apprentice.loader` (shared with `apprentice serve`); this module adds the trainer's
choices: the master-weight dtype from trainer.precision, packing-aware attention, no KV cache, train mode.
How the model is then wrapped (activation checkpointing, compile, FSDP2) is trainer/parallelize.py.
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import PreTrainedModel

from apprentice.config.model import ModelConfig
from apprentice.loader import load_causal_lm
from apprentice.trainer import attention


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


def load_model(cfg: ModelConfig, device: torch.device, param_dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The student in training mode on `device`, weights in `param_dtype` (the precision's master dtype)."""
    model: PreTrainedModel = load_causal_lm(
        cfg.name,
        dtype=param_dtype,
        device=device,
        attn_implementation=resolve_attention(cfg, device),
        trust_remote_code=cfg.trust_remote_code,
        gguf_file=cfg.gguf_file,
    )
    model.config.use_cache = False
    model.train()
    return model
