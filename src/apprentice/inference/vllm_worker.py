"""vLLM worker extension (loaded inside vLLM's workers via `--worker-extension-cls`): reload weights from a
published Hugging Face directory in place, so the server never restarts between RL steps.

Called through vLLM's dev-mode `POST /collective_rpc {"method": "reload", "args": [DIR]}` (see
inference/backends.py): the last act of the weight-update path of apprentice.handoff. Imported by vLLM, never by
apprentice itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import safe_open

from apprentice.handoff.weights import verify


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

    def reload(self, path: str) -> int:
        """Verify `path`, then load every tensor of it into the running model (vLLM maps HF names to its fused
        layers); a damaged directory is set aside and the error (one line) goes back to the caller."""
        verify(Path(path))
        model = self.model_runner.model
        loaded = model.load_weights(weights=_tensors(Path(path)))
        torch.cuda.synchronize()
        return len(loaded) if loaded is not None else 0
