"""`[inference]`: the local inference server of rl mode."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from apprentice.config.base import Section


class InferenceConfig(Section):
    backend: Literal["vllm", "builtin"] = "builtin"
    """"vllm" on GPU machines (needs the `vllm` extra); "builtin" is apprentice's own CPU/GPU server."""
    host: str = "127.0.0.1"
    """Interface to bind; loopback unless you mean to expose it."""
    port: int = Field(default=8001, ge=1, le=65535)
    """Port of the OpenAI-compatible server."""
    max_batch_size: int = Field(default=32, ge=1)
    """Requests decoded together in one batch."""
