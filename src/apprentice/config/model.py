"""`[model]`: the student."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from apprentice.config.base import Section


class ModelConfig(Section):
    name: str = Field(min_length=1)
    """Hugging Face model id or local directory of the student (its tokenizer and chat template included)."""
    tokenizer: str | None = None
    """Tokenizer id or directory, when it differs from `name`."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside `name` (dequantised on load), e.g. for models shipped as GGUF."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Load dtype of the weights. The trainer keeps fp32 master weights and picks its compute dtype with
    trainer.precision, so leave this "auto" (a bf16 value here is refused: it used to mean bf16 weights)."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run. Off unless you trust the repository."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory (about 30% slower)."""
    attn_implementation: str | None = None
    """transformers attention backend ("sdpa", "flash_attention_2", ...); None picks the best available."""
