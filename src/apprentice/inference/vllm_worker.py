"""vLLM worker extension (loaded inside vLLM's workers via `--worker-extension-cls`): reload weights from a
published Hugging Face directory in place, so the server never restarts between RL steps.

Called through vLLM's dev-mode `POST /collective_rpc {"method": "reload_weights_from", "args": [DIR]}`
(see inference/backends.py). Needs only vLLM and safetensors; imported by vLLM, never by apprentice itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import safe_open


def _tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files to load")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


class WeightReloader:
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's."""

    model_runner: Any

    def reload_weights_from(self, path: str) -> int:
        """Load every tensor of `path` into the running model (vLLM maps HF names to its fused layers)."""
        model = self.model_runner.model
        loaded = model.load_weights(weights=_tensors(Path(path)))
        torch.cuda.synchronize()
        return len(loaded) if loaded is not None else 0
