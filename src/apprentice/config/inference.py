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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of the server ("auto": bfloat16 on GPU, float32 on CPU). Keep it equal to the trainer's
    precision for exact importance ratios."""
    threads: int | None = Field(default=None, ge=1)
    """builtin backend: torch threads of the server. Default: half of the cores this machine lets the run use
    (at least one); the trainer gets the rest (apprentice/cpu_budget.py)."""
    startup_timeout_s: float = Field(default=600.0, gt=0.0)
    """How long the orchestrator waits for the server to answer before failing."""
    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=1.0)
    """vllm backend: fraction of GPU memory vLLM may take (the trainer needs the rest on a shared GPU)."""
    extra_args: list[str] = Field(default_factory=list)
    """Extra command-line arguments of the server (e.g. ["--max-model-len", "4096"] for vLLM)."""
